"""Engines and schema migrations for the state database.

Engines are made here and passed down; nothing opens a connection at import time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from sync.errors import (
    SchemaOutOfDateError,
    SchemaTooNewError,
    StateDatabaseMissingError,
    StateError,
    driver_reason,
    missing_driver,
)
from sync.models import INSTALLATION, utcnow
from sync.redaction import redact_url

# How long a SQLite writer waits for another (the daemon and a manual `sync` share one file).
SQLITE_BUSY_TIMEOUT_MS = 30_000

UPGRADE_HINT = "audience-sync db upgrade"


def _migrations_dir() -> Path:
    packaged = Path(__file__).parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def _configure_sqlite_reader(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    # WAL lets the daemon write while `status` and friends read.
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def make_state_engine(url: str, *, must_exist: bool = False, read_only: bool = False) -> Engine:
    """Create the engine for the state database, configured for concurrent use.

    ``must_exist`` refuses to create a missing SQLite file; ``read_only`` (inspection commands)
    opens SQLite with ``mode=ro`` and runs every PostgreSQL transaction ``READ ONLY``.
    """
    parsed = make_url(url)
    must_exist = must_exist or read_only
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database)
            if read_only and path.exists():
                ro_url = parsed.set(database=f"file:{path}", query={"mode": "ro", "uri": "true"})
                engine = create_engine(ro_url)
                event.listen(engine, "connect", _configure_sqlite_reader)
                return engine
            if must_exist and not path.exists():
                raise StateDatabaseMissingError(
                    f"state database {path} does not exist; run `{UPGRADE_HINT}` to create it"
                )
            if not path.parent.exists():
                raise StateError(f"state database folder {path.parent} does not exist")
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        raise StateError(f"state database: {missing_driver(exc, parsed.drivername)}") from None
    if read_only:
        event.listen(engine, "begin", read_only_transaction)
    return engine


def read_only_transaction(connection: Connection) -> None:
    """Begin-event hook: make the transaction READ ONLY (PostgreSQL, MySQL)."""
    # On the raw DBAPI cursor: the Connection may be set to stream through a server-side
    # cursor, which cannot carry a SET statement.
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET TRANSACTION READ ONLY")
    finally:
        cursor.close()


def alembic_config(engine: Engine) -> AlembicConfig:
    """An Alembic config bound to ``engine`` (no alembic.ini needed)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest migration this version of audience-sync knows."""
    script = ScriptDirectory(str(_migrations_dir()))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the state database is at, or None when it has no schema yet."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise StateError(
            f"cannot open the state database {redact_url(str(engine.url))}: {driver_reason(exc)}"
        ) from None


SchemaState = Literal["current", "behind", "empty", "ahead"]


@dataclass(frozen=True)
class SchemaStatus:
    """Where the state database schema stands against this version's migrations."""

    current: str | None
    head: str
    state: SchemaState


def schema_status(engine: Engine) -> SchemaStatus:
    """Compare the database's revision with the newest migration."""
    current = current_revision(engine)
    head = head_revision()
    if current is None:
        return SchemaStatus(current, head, "empty")
    if current == head:
        return SchemaStatus(current, head, "current")
    script = ScriptDirectory(str(_migrations_dir()))
    known = {rev.revision for rev in script.walk_revisions()}
    return SchemaStatus(current, head, "behind" if current in known else "ahead")


def require_current_schema(engine: Engine) -> None:
    """Refuse to work on a state database whose schema is not this version's."""
    status = schema_status(engine)
    where = redact_url(str(engine.url))
    if status.state == "empty":
        raise SchemaOutOfDateError(
            f"state database {where} has no schema yet; run `{UPGRADE_HINT}`"
        )
    if status.state == "behind":
        raise SchemaOutOfDateError(
            f"state database {where} is at schema {status.current}, this version needs "
            f"{status.head}; run `{UPGRADE_HINT}`"
        )
    if status.state == "ahead":
        raise SchemaTooNewError(
            f"state database {where} is at schema {status.current}, which this version of "
            "audience-sync does not know; upgrade audience-sync"
        )


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the state database up to ``revision``."""
    status = schema_status(engine)
    if status.state == "ahead":
        require_current_schema(engine)
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the state database down to ``revision`` (``base`` removes everything)."""
    command.downgrade(alembic_config(engine), revision)


def installation_id(connection: Connection) -> str:
    """This state database's installation id, created on first use."""
    found = connection.execute(select(INSTALLATION.c.installation_id)).scalar()
    if found is not None:
        return str(found)
    new_id = secrets.token_hex(8)
    connection.execute(insert(INSTALLATION).values(installation_id=new_id, created_at=utcnow()))
    return new_id


def open_state(url: str, *, auto_upgrade: bool = False) -> Engine:
    """The state engine for commands that write: the schema must be current, or is migrated
    first when ``auto_upgrade`` is set (``[state] auto_upgrade = true``)."""
    engine = make_state_engine(url)
    try:
        if auto_upgrade and schema_status(engine).state in ("empty", "behind"):
            upgrade(engine)
        require_current_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
