"""Alembic environment: migrates the engine audience-sync hands over (see sync.db)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from sync.db import compare_column_type
from sync.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine: Engine | None = context.config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("run migrations through `audience-sync db upgrade`")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=compare_column_type,
            render_as_batch=True,  # SQLite needs table copies for most ALTERs
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
