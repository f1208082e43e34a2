"""Engines and schema migrations for the state database.

Engines are made here and passed down; nothing opens a connection at import time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Insert, Table, create_engine, event, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from sync.errors import (
    SchemaOutOfDateError,
    SchemaTooNewError,
    StateDatabaseMissingError,
    StateError,
    driver_reason,
    missing_driver,
)
from sync.redaction import redact_url
from sync.state.tables import INSTALLATION, MYSQL_DIALECTS, STAGED, utcnow

# How long a SQLite writer waits for another (the daemon and a manual `sync` share one file).
SQLITE_BUSY_TIMEOUT_MS = 30_000

UPGRADE_HINT = "audience-sync db upgrade"


def _migrations_dir() -> Path:
    # In the wheel: sync/migrations; in a source checkout: the repository's migrations/.
    packaged = Path(__file__).resolve().parent.parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


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


# Each delivery worker holds a connection for its whole delivery (``concurrency`` up to 64 per
# destination, times the daemon's ``workers``): the pool keeps 5 and opens the rest on demand,
# bounded by the server's own connection limit, not by QueuePool's default overflow of 10 (a
# run with concurrency 15 on PostgreSQL timed out waiting for a connection).
UNCAPPED_OVERFLOW = -1


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
            if not path.parent.exists():  # first: `db upgrade` could not create it either
                raise StateError(f"state database folder {path.parent} does not exist")
            if must_exist and not path.exists():
                raise StateDatabaseMissingError(
                    f"state database {path} does not exist; run `{UPGRADE_HINT}` to create it"
                )
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    try:
        if parsed.get_backend_name() in MYSQL_DIALECTS:
            return _make_mysql_engine(url, read_only=read_only)
        engine = create_engine(url, pool_pre_ping=True, max_overflow=UNCAPPED_OVERFLOW)
    except ImportError as exc:
        raise StateError(f"state database: {missing_driver(exc, parsed.drivername)}") from None
    if read_only:
        event.listen(engine, "begin", read_only_transaction)
    return engine


def _configure_mysql(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Timestamps are stored as UTC without a zone (models.UTCDateTime): the database's own
    # clock (NOW()) must read UTC too, whatever the server's time zone.
    cursor.execute("SET time_zone = '+00:00'")
    # Strict mode: a value too long or of the wrong type is an error, never silently truncated
    # (two truncated ids would merge).
    cursor.execute(
        "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'STRICT_ALL_TABLES')"
    )
    cursor.close()


def _make_mysql_engine(url: str, *, read_only: bool) -> Engine:
    # READ COMMITTED, as on PostgreSQL: each statement sees what others committed before it.
    # Under InnoDB's default REPEATABLE READ, a transaction keeps reading its first snapshot,
    # so e.g. the loser of two concurrent audience creations would not see the winner's row.
    engine = create_engine(
        url,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
        max_overflow=UNCAPPED_OVERFLOW,
    )
    event.listen(engine, "connect", _configure_mysql)
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


def compare_column_type(
    context: MigrationContext,
    _inspected_column: Any,
    _metadata_column: Any,
    inspected_type: Any,
    metadata_type: Any,
) -> bool | None:
    """Alembic ``compare_type`` hook: a column whose collation differs from the model's
    (``models.Key`` on MySQL/MariaDB) differs, which Alembic's own comparison ignores; None
    leaves every other type comparison to Alembic."""
    wanted = getattr(metadata_type.dialect_impl(context.dialect), "collation", None)
    if wanted is not None and getattr(inspected_type, "collation", None) != wanted:
        return True
    return None


def alembic_config(connection: Connection) -> AlembicConfig:
    """An Alembic config that migrates on ``connection`` (no alembic.ini needed)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


@dataclass(frozen=True)
class MigrationPause:
    """Test seam (``db upgrade --test-pause-before TEXT --test-ready-file PATH``): before the
    first SQL statement containing ``statement``, create ``ready`` and wait until killed, or
    until the test deletes ``ready`` (then go on)."""

    statement: str
    ready: Path

    def install(self, connection: Connection) -> None:
        """Make ``connection`` stop there."""

        def pause(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if self.statement in statement:
                self.ready.touch()
                while self.ready.exists():  # until the test kills this process or lets it go
                    time.sleep(0.05)

        event.listen(connection, "before_cursor_execute", pause)


logger = logging.getLogger("sync.state")

# How long a `db upgrade` waits for another one migrating the same state DB.
MIGRATION_LOCK_SECONDS = 3600
_PG_MIGRATION_LOCK = int.from_bytes(b"audsyncm", "big") >> 1  # an advisory lock key (bigint)


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the state DB's migration lock: two `db upgrade`s (a daemon and a cron `sync` with
    ``auto_upgrade``, two replicas) starting together on a server DB take turns, and the
    second finds the schema current. Without it, on MariaDB (each DDL commits at once, and a
    rerun skips what is done) both ran every revision and each inserted its version row: two
    heads, and every later command refused. A session lock, so a killed upgrade releases it.
    SQLite needs none: its migration holds the one write lock from its first statement."""
    dialect = connection.dialect.name
    if dialect not in ("postgresql", *MYSQL_DIALECTS):
        yield
        return
    if dialect == "postgresql":
        acquire = f"SELECT pg_try_advisory_lock({_PG_MIGRATION_LOCK})"
        wait = f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})"
        release = f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})"
    else:
        # Named locks are server-wide: one per database.
        database = connection.exec_driver_sql("SELECT DATABASE()").scalar() or ""
        name = "audience-sync:" + hashlib.sha1(str(database).encode()).hexdigest()[:40]
        acquire = f"SELECT GET_LOCK('{name}', 0)"
        wait = f"SELECT GET_LOCK('{name}', {MIGRATION_LOCK_SECONDS})"
        release = f"SELECT RELEASE_LOCK('{name}')"
    if connection.exec_driver_sql(acquire).scalar() not in (1, True):
        logger.warning(
            "another process is migrating this state database (`db upgrade`, or a command "
            "with auto_upgrade); waiting for it to finish"
        )
        too_long = StateError(
            f"another `db upgrade` held this state database's migration lock for "
            f"{MIGRATION_LOCK_SECONDS} s; try again once it has finished"
        )
        if dialect == "postgresql":
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_SECONDS}s'")
            try:
                connection.exec_driver_sql(wait)
            except OperationalError:
                raise too_long from None
        elif connection.exec_driver_sql(wait).scalar() != 1:
            raise too_long
    connection.commit()  # the lock outlives this transaction; the migration starts afresh
    try:
        yield
    finally:
        connection.rollback()
        connection.exec_driver_sql(release)
        connection.commit()


def _configure_sqlite_migration(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite must not begin or commit on its own (it runs DDL outside any transaction):
    # ``_begin_sqlite_migration`` opens the one transaction the whole upgrade runs in.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # Off while tables are recreated (Alembic's batch copies): dropping a table others refer
    # to would cascade into them or be refused. It cannot change inside a transaction, hence
    # here; env.py runs PRAGMA foreign_key_check before committing.
    cursor.execute("PRAGMA foreign_keys = OFF")
    cursor.close()


def _begin_sqlite_migration(connection: Connection) -> None:
    # IMMEDIATE: hold the write lock from the start, so no daemon writes between two steps.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _migration_connection(engine: Engine, pause: MigrationPause | None) -> Iterator[Connection]:
    """The connection migrations run on. SQLite gets one of its own, made transactional for
    DDL, so that a killed upgrade leaves the revision it started from (PostgreSQL's DDL is
    transactional already; MySQL commits each DDL statement). The engines that sync use keep
    pysqlite's default behaviour."""
    migrating = engine
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        migrating = create_engine(engine.url, poolclass=NullPool)
        event.listen(migrating, "connect", _configure_sqlite_migration)
        event.listen(migrating, "begin", _begin_sqlite_migration)
    try:
        with migrating.connect() as connection, migration_lock(connection):
            if pause is not None:
                pause.install(connection)
            yield connection
    finally:
        if migrating is not engine:
            migrating.dispose()
            # The caller's pooled connections keep the schema they read before: SQLite's
            # PRAGMA index_list, for one, does not notice another connection's DDL.
            engine.dispose()


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


def upgrade(
    engine: Engine, revision: str = "head", *, pause: MigrationPause | None = None
) -> str | None:
    """Migrate the state database up to ``revision``; return the revision it was at when the
    migration lock was ours (None: no schema), which is what this call upgraded from: another
    process may have upgraded it while this one waited."""
    status = schema_status(engine)
    if status.state == "ahead":
        require_current_schema(engine)
    with _migration_connection(engine, pause) as connection:
        found = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(alembic_config(connection), revision)
    return found


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the state database down to ``revision`` (``base`` removes everything)."""
    with _migration_connection(engine, None) as connection:
        command.downgrade(alembic_config(connection), revision)


@dataclass(frozen=True)
class ConnectionRoom:
    """How many connections a server state DB accepts from us, and how many are open now."""

    allowed: int
    in_use: int


def connection_room(connection: Connection) -> ConnectionRoom | None:
    """The server's connection limit (less PostgreSQL's superuser reserve) and the
    connections open now; None on SQLite, which has no such limit."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        limit = int(connection.exec_driver_sql("SHOW max_connections").scalar_one())
        reserved = int(
            connection.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one()
        )
        used = connection.exec_driver_sql("SELECT count(*) FROM pg_stat_activity").scalar_one()
        return ConnectionRoom(limit - reserved, int(used))
    if dialect in MYSQL_DIALECTS:
        limit = connection.exec_driver_sql("SELECT @@max_connections").scalar_one()
        used = connection.exec_driver_sql("SHOW STATUS LIKE 'Threads_connected'").one()[1]
        return ConnectionRoom(int(limit), int(used))
    return None


def installation_id(connection: Connection) -> str:
    """This state database's installation id, created on first use."""
    found = connection.execute(select(INSTALLATION.c.installation_id)).scalar()
    if found is not None:
        return str(found)
    new_id = secrets.token_hex(8)
    connection.execute(insert(INSTALLATION).values(installation_id=new_id, created_at=utcnow()))
    return new_id


def open_state(url: str, *, auto_upgrade: bool = False, create: bool = True) -> Engine:
    """The state engine for commands that write: the schema must be current, or is migrated
    first when ``auto_upgrade`` is set (``[state] auto_upgrade = true``). Without it a missing
    SQLite file is refused, not created: a refused command leaves no empty file behind; nor
    with ``create = False`` (commands about what the state DB already holds: retry, retire)."""
    engine = make_state_engine(url, must_exist=not (auto_upgrade and create))
    try:
        if auto_upgrade and schema_status(engine).state in ("empty", "behind"):
            upgrade(engine)
        require_current_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def insert_ignoring_duplicates(connection: Connection, table: Table = STAGED) -> Insert:
    """``INSERT`` that silently skips rows whose key exists (staged members, audiences)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect in ("mysql", "mariadb"):
        return insert(table).prefix_with("IGNORE")
    return insert(table).prefix_with("OR IGNORE")


def idle_transaction_limit(connection: Connection, seconds: float | None) -> None:
    """Let the server end this session's transactions once they stay idle longer than
    ``seconds`` (None: the server's default again), committing the setting.

    For the connections that write a delivery's outcomes, with the lease's life: a process
    frozen (stopped, paged out, cut off from the server) inside such a transaction holds
    row locks its successor, which took the expired lease over, would wait on for as long as
    the freeze lasts (PostgreSQL: for ever; MariaDB: its lock wait timeout, then fail). The
    frozen process cannot commit anyway (its fence fails). PostgreSQL's
    ``idle_in_transaction_session_timeout``, MariaDB's ``idle_transaction_timeout``; MySQL,
    MariaDB before 10.3 and SQLite have no such setting (a frozen SQLite writer holds the one
    write lock)."""
    dialect = connection.dialect
    if dialect.name == "postgresql":
        value = "DEFAULT" if seconds is None else str(max(1, round(seconds * 1000)))
        connection.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {value}")
    elif getattr(dialect, "is_mariadb", False):
        if (dialect.server_version_info or (0,)) < (10, 3):
            return  # MariaDB 10.2 has no such setting
        value = "DEFAULT" if seconds is None else str(max(1, math.ceil(seconds)))
        connection.exec_driver_sql(f"SET SESSION idle_transaction_timeout = {value}")
    else:
        return
    connection.commit()
