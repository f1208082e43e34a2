"""A dry run's private scratch: a throwaway SQLite copy of what one audience's plan reads.

A dry run stages and plans exactly as a run does, with the same code, but into this copy: it
never writes the state DB, so it holds no lock there while the source query runs, and a real
`sync` goes ahead meanwhile, even with ``--wait 0``. The state DB is only read, once the source
query is done, for the audience's own rows (SQLite in WAL mode and PostgreSQL let writers go on
during a read).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Table,
    Text,
    and_,
    cast,
    create_engine,
    event,
    insert,
    literal,
    select,
)

from sync.state.tables import AUDIENCES, DELIVERY_PROGRESS, MEMBERSHIPS, STAGED, Base, UTCDateTime

# The tables planning reads and writes (planner, recover_in_flight, ensure_audience).
SCRATCH_TABLES = (AUDIENCES, MEMBERSHIPS, DELIVERY_PROGRESS, STAGED)
# Rows copied per round trip: bounded memory for audiences of millions.
COPY_CHUNK_ROWS = 20_000
# The staged snapshot's run id inside the scratch (it holds no runs table and no other run).
DRY_RUN_ID = 0


def _throwaway(dbapi_connection: Any, _record: Any) -> None:
    # Nothing here survives the dry run: no journal, no fsync.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = OFF")
    cursor.execute("PRAGMA synchronous = OFF")
    cursor.close()


@contextmanager
def scratch_state() -> Iterator[Connection]:
    """A connection to an empty scratch database with the planning tables, deleted after."""
    with tempfile.TemporaryDirectory(prefix="audience-sync-dry-run-") as folder:
        engine = create_engine(f"sqlite:///{Path(folder) / 'scratch.db'}")
        event.listen(engine, "connect", _throwaway)
        try:
            Base.metadata.create_all(engine, tables=list(SCRATCH_TABLES))
            with engine.begin() as connection:
                for table in SCRATCH_TABLES:  # only the keys: each index costs a B-tree write
                    for index in table.indexes:
                        connection.exec_driver_sql(f'DROP INDEX "{index.name}"')
            with engine.connect() as connection:
                yield connection
        finally:
            engine.dispose()


def copy_audiences(state: Engine, scratch: Connection) -> None:
    """Every audience row (a few), so that ``ensure_audience`` decides as on the state DB."""
    with state.connect() as connection:
        rows = [dict(r) for r in connection.execute(select(AUDIENCES)).mappings()]
    if rows:
        scratch.execute(insert(AUDIENCES), rows)


def copy_audience_state(
    state: Engine, scratch: Connection, key: str, audience_id: int, destinations: Sequence[str]
) -> None:
    """The memberships and delivery progress of the audience ``key`` at ``destinations``,
    filed under ``audience_id`` in the scratch (an audience the state DB does not have yet
    has none)."""
    stored_id = select(AUDIENCES.c.id).where(AUDIENCES.c.key == key).scalar_subquery()
    with state.connect() as connection:
        for table in (MEMBERSHIPS, DELIVERY_PROGRESS):
            where = and_(table.c.audience_id == stored_id, table.c.destination.in_(destinations))
            _copy(connection, scratch, table, where, audience_id)


def _copy(
    state: Connection, scratch: Connection, table: Table, where: Any, audience_id: int
) -> None:
    """Rows as the drivers give them (a million memberships, with no per-value conversion):
    JSON and timestamps travel as text, which planning compares or overwrites, never parses."""
    columns = [
        literal(audience_id).label(c.name)
        if c.name == "audience_id"
        else cast(c, Text).label(c.name)
        if isinstance(c.type, JSON | UTCDateTime)
        else c
        for c in table.columns
    ]
    names = ", ".join(f'"{c.name}"' for c in table.columns)
    marks = ", ".join("?" for _ in table.columns)
    statement = f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})'
    streamed = state.execution_options(stream_results=True, yield_per=COPY_CHUNK_ROWS)
    # In key order: the scratch's B-trees grow by appending.
    result = streamed.execute(select(*columns).where(where).order_by(*table.primary_key.columns))
    for chunk in result.partitions(COPY_CHUNK_ROWS):
        scratch.exec_driver_sql(statement, [tuple(row) for row in chunk])
