"""Alembic environment: migrates on the connection audience-sync hands over (see sync.state.db)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from sync.state import resumable
from sync.state.db import compare_column_type
from sync.state.tables import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `audience-sync db upgrade`")
    sqlite = connection.dialect.name == "sqlite"
    resumable.install()  # MariaDB/MySQL: a killed upgrade's rerun completes its revision
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=compare_column_type,
        render_as_batch=True,  # SQLite needs table copies for most ALTERs
        # SQLite's DDL is transactional, but Alembic assumes not: one transaction for the
        # whole upgrade, so a killed one leaves the previous revision (see sync.state.db).
        transactional_ddl=True if sqlite else None,
    )
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            check_foreign_keys(connection)
    connection.commit()


def check_foreign_keys(connection: Connection) -> None:
    """Refuse to commit a migration that left rows pointing nowhere (SQLite migrates with
    foreign keys off)."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise RuntimeError(f"migration left rows with broken foreign keys in {', '.join(tables)}")


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
