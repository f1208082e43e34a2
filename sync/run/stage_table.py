"""Writing a run's snapshot into the ``staged_members`` table, the fastest way each database
takes it (SQLite: the driver's executemany of plain tuples; PostgreSQL: COPY), and what the
planner needs afterwards (counts, fresh statistics)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Insert, func, select, text
from sqlalchemy.exc import DBAPIError

from sync.state.tables import STAGED

# SQLite's driver inserts plain tuples much faster than SQLAlchemy binds dicts (no per-row
# parameter processing): the staging insert is the hot loop of compute.
_SQLITE_STAGE = (
    "INSERT OR IGNORE INTO staged_members "
    "(run_id, id_kind, member_id, anonymous_id, traits, value) VALUES (?, ?, ?, ?, ?, ?)"
)


# PostgreSQL: COPY each chunk straight into staged_members. COPY cannot skip a member staged
# twice, so a chunk that repeats one goes through a session-private table and one INSERT … ON
# CONFLICT DO NOTHING instead (that path costs several times more per row: rare data only).
_PG_COLUMNS = "(run_id, id_kind, member_id, anonymous_id, traits, value)"
_PG_INCOMING = (
    "CREATE TEMP TABLE IF NOT EXISTS staged_incoming (run_id integer, id_kind varchar(16), "
    "member_id varchar(255), anonymous_id varchar(255), traits json, value text)"
)
_PG_MOVE = (
    f"INSERT INTO staged_members {_PG_COLUMNS} "
    "SELECT run_id, id_kind, member_id, anonymous_id, traits, value FROM staged_incoming "
    "ON CONFLICT DO NOTHING"
)


def _copy_text(value: str | None) -> str:
    """A value in COPY's text format. Ids cannot hold tabs, newlines or NULs (validation
    refuses them) and JSON text escapes every control character, so only the backslash needs
    escaping."""
    return "\\N" if value is None else value.replace("\\", "\\\\")


def _copy_staged(state: Connection, rows: list[tuple[Any, ...]]) -> None:
    import psycopg  # only here: the PostgreSQL driver is an optional extra

    dbapi_connection: Any = state.connection.dbapi_connection
    # One text block per chunk, instead of psycopg adapting and formatting row by row.
    block = "".join(
        f"{run_id}\t{kind}\t{_copy_text(member)}\t{_copy_text(anon)}\t{_copy_text(traits)}"
        f"\t{_copy_text(value)}\n"
        for run_id, kind, member, anon, traits, value in rows
    )
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SAVEPOINT staging_chunk")
            try:
                with cursor.copy(f"COPY staged_members {_PG_COLUMNS} FROM STDIN") as copy:
                    copy.write(block)
            except psycopg.errors.UniqueViolation:
                cursor.execute("ROLLBACK TO SAVEPOINT staging_chunk")
                cursor.execute(_PG_INCOMING)
                with cursor.copy(f"COPY staged_incoming {_PG_COLUMNS} FROM STDIN") as copy:
                    copy.write(block)
                cursor.execute(_PG_MOVE)
                cursor.execute("TRUNCATE staged_incoming")
            cursor.execute("RELEASE SAVEPOINT staging_chunk")
    except psycopg.Error as exc:
        # The raw driver's error, as SQLAlchemy would have wrapped it (a database error).
        raise DBAPIError.instance("COPY staged_members", None, exc, psycopg.Error) from exc


def insert_staged(state: Connection, statement: Insert, rows: list[tuple[Any, ...]]) -> None:
    """Rows are ``(run_id, id_kind, member_id, anonymous_id, traits JSON text, value JSON
    text)``."""
    if state.dialect.name == "postgresql" and state.dialect.driver == "psycopg":
        _copy_staged(state, rows)
        return
    if state.dialect.name == "sqlite":
        state.exec_driver_sql(_SQLITE_STAGE, rows)
        return
    columns = ("run_id", "id_kind", "member_id", "anonymous_id", "traits", "value")
    dicts = [dict(zip(columns, row, strict=True)) for row in rows]
    for values in dicts:  # the generic path binds the JSON column with a Python value
        values["traits"] = None if values["traits"] is None else json.loads(values["traits"])
    state.execute(statement, dicts)


def count_staged(connection: Connection, run_id: int) -> int:
    """How many distinct members a run staged."""
    query = select(func.count()).select_from(STAGED).where(STAGED.c.run_id == run_id)
    return int(connection.execute(query).scalar_one())


def refresh_statistics(connection: Connection, *, memberships_only: bool = False) -> None:
    """Let PostgreSQL's planner see the staged snapshot's size before planning joins on it
    (without this it estimates one row and picks nested loops: quadratic at scale)."""
    if connection.dialect.name == "postgresql":
        if not memberships_only:
            connection.execute(text("ANALYZE staged_members"))
        connection.execute(text("ANALYZE memberships"))
