"""Source databases: where audience queries run, opened read-only where the database allows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from sync.db import read_only_transaction
from sync.errors import SourceError, driver_reason, missing_driver
from sync.redaction import redact_url


def make_source_engine(name: str, url: str) -> Engine:
    """An engine for source ``name`` that cannot write (SQLite ``mode=ro``, PostgreSQL
    read-only transactions); a missing driver is a ``SourceError`` naming what to install."""
    parsed = make_url(url)
    try:
        return _source_engine(name, parsed)
    except ImportError as exc:
        reason = missing_driver(exc, parsed.drivername)
        raise SourceError(f'source "{name}": {reason}') from None
    except NoSuchModuleError:
        raise SourceError(
            f'source "{name}": no SQLAlchemy dialect is installed for {parsed.drivername}://; '
            "install the package that provides it (e.g. snowflake-sqlalchemy for snowflake://)"
        ) from None


def _source_engine(name: str, parsed: URL) -> Engine:
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            if not Path(database).exists():
                raise SourceError(f'source "{name}": database file {database} does not exist')
            ro_url = parsed.set(database=f"file:{database}", query={"mode": "ro", "uri": "true"})
            return create_engine(ro_url)
        return create_engine(parsed)
    if backend == "postgresql":
        engine = create_engine(parsed, pool_pre_ping=True)
        event.listen(engine, "begin", read_only_transaction)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def check_source(name: str, url: str) -> None:
    """Connect to a source and run ``SELECT 1``; raise ``SourceError`` saying why not."""
    try:
        engine = make_source_engine(name, url)
    except SQLAlchemyError as exc:
        raise SourceError(f'source "{name}" ({redact_url(url)}): {driver_reason(exc)}') from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise SourceError(
            f'source "{name}" ({redact_url(url)}): cannot connect: {driver_reason(exc)}'
        ) from None
    finally:
        engine.dispose()


def demo_warehouse_exists(url: str) -> bool:
    """Whether the SQLite file behind a ``demo = true`` source exists yet."""
    database = make_url(url).database
    return bool(database) and Path(str(database)).exists()
