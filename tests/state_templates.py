"""Migrated state databases for tests, without running the whole migration chain per test.

Each test process runs the real migrations (``sync.state.db.upgrade``) once per kind of state
DB and gives every later test a copy of what they made: the SQLite file copied; on PostgreSQL
the statements the migrations executed, replayed (not the catalogue reads); on MariaDB/MySQL the
final tables and views as the server shows them (``SHOW CREATE``: replaying the migrations'
``ALTER``s rebuilds tables, which costs nearly as much as migrating), and the rows the
migrations wrote. Migrating took 0.7 to 2 s per test (most of the suite's set-up time); a copy
takes milliseconds to a few hundred.

``tests/test_db.py::test_a_test_template_is_the_migrated_schema`` checks, on every state DB,
that a copy is the schema a real upgrade makes; ``tests/test_db.py`` itself migrates for real.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from sync.state.db import upgrade

_sqlite: Path | None = None
_postgres: list[tuple[str, Any, bool]] | None = None
_mysql: list[tuple[str, list[dict[str, Any]] | None]] | None = None


def migrate(engine: Engine) -> None:
    """Bring the empty state database of ``engine`` to head: a real upgrade the first time in
    this process for its kind of database, a copy of its result afterwards."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        _sqlite_copy(engine)
    elif dialect == "postgresql":
        _postgres_copy(engine)
    else:
        _mysql_copy(engine)


def _sqlite_copy(engine: Engine) -> None:
    global _sqlite
    path = Path(str(engine.url.database))
    if _sqlite is None:
        upgrade(engine)
        engine.dispose()  # the last connection closed: the WAL is checkpointed into the file
        wal = Path(f"{path}-wal")
        assert not wal.exists() or wal.stat().st_size == 0, f"{wal} still holds changes"
        folder = tempfile.mkdtemp(prefix="state-template-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = Path(folder) / "state.db"
        shutil.copyfile(path, template)
        _sqlite = template
        return
    engine.dispose()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(_sqlite, path)


_READS = ("SELECT", "SHOW", "DESCRIBE", "PRAGMA")


def _postgres_copy(engine: Engine) -> None:
    global _postgres
    if _postgres is None:
        executed: list[tuple[str, Any, bool]] = []

        def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
            executed.append((statement, params, many))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            upgrade(engine)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        # The catalogue reads and the migration lock (a SELECT of pg_advisory_lock) are left
        # out: what a replay needs is what the migrations wrote.
        _postgres = [e for e in executed if e[0].lstrip().split()[0].upper() not in _READS]
        return
    with engine.begin() as connection:
        for statement, params, _many in _postgres:
            connection.exec_driver_sql(statement, params if params else ())


def _mysql_copy(engine: Engine) -> None:
    global _mysql
    if _mysql is None:
        upgrade(engine)
        _mysql = _mysql_schema(engine)
        return
    with engine.begin() as connection:
        connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        try:
            for ddl, rows in _mysql:
                connection.exec_driver_sql(ddl)
                if rows:
                    table = re.match(r"CREATE TABLE `([^`]+)`", ddl)
                    assert table is not None
                    names = list(rows[0])
                    connection.exec_driver_sql(
                        f"INSERT INTO `{table.group(1)}` ({', '.join(f'`{n}`' for n in names)}) "
                        f"VALUES ({', '.join(['%s'] * len(names))})",
                        [tuple(row[n] for n in names) for row in rows],
                    )
        finally:
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


def _mysql_schema(engine: Engine) -> list[tuple[str, list[dict[str, Any]] | None]]:
    """The migrated database's tables (with their rows) and then its views, as statements that
    make them in another database."""
    database = str(engine.url.database)
    tables: list[tuple[str, list[dict[str, Any]] | None]] = []
    views: list[tuple[str, list[dict[str, Any]] | None]] = []
    with engine.connect() as connection:
        for name, kind in connection.exec_driver_sql("SHOW FULL TABLES").all():
            if kind == "VIEW":
                ddl = connection.exec_driver_sql(f"SHOW CREATE VIEW `{name}`").one()[1]
                ddl = re.sub(r" DEFINER=\S+ SQL SECURITY \w+", "", ddl)
                views.append((ddl.replace(f"`{database}`.", ""), None))
                continue
            ddl = connection.exec_driver_sql(f"SHOW CREATE TABLE `{name}`").one()[1]
            ddl = re.sub(r" AUTO_INCREMENT=[0-9]+", "", ddl)
            rows = [dict(r._mapping) for r in connection.exec_driver_sql(f"SELECT * FROM `{name}`")]
            tables.append((ddl, rows or None))
    return tables + views
