"""Source databases: where audience queries run, opened read-only where the database allows."""

from __future__ import annotations

import decimal
import json
import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from sync.errors import SourceError, driver_reason, missing_driver
from sync.redaction import redact_url
from sync.state.db import read_only_transaction


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
        if parsed.get_driver_name() == "psycopg":
            event.listen(engine, "connect", exact_json_numbers)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def exact_json_numbers(dbapi_connection: Any, _record: Any) -> None:
    """psycopg reads json/jsonb numbers as floats by default: ``19.990000000000000001`` would
    become ``19.99`` and a change in its last digit would go unseen. Read them as decimals."""
    from psycopg.types.json import set_json_loads

    set_json_loads(partial(json.loads, parse_float=decimal.Decimal), dbapi_connection)


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


# --- values a driver cannot convert ----------------------------------------------------------
# The fast path reads with the drivers' own converters, which fail the whole fetch on one such
# value. Only then is the query run again on a connection that reads them as markers.

# SQLite's message for TEXT that is not UTF-8 (Modules/_sqlite/cursor.c).
SQLITE_UNDECODABLE = "Could not decode to UTF-8"
# PostgreSQL types whose values may lie outside Python's range (infinity, BC, year > 9999).
PG_RANGED_TYPES = ("date", "timestamp", "timestamptz", "interval")


class Unconvertible:
    """A source value the driver could not convert (a PostgreSQL ``infinity`` date): its row is
    invalid."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unconvertible({self.reason!r})"


def conversion_failed(exc: Exception) -> bool:
    """Whether a fetch failed on a value the driver could not convert (not on the query)."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, sqlite3.OperationalError):
        return str(orig).startswith(SQLITE_UNDECODABLE)
    if type(orig).__module__.startswith("psycopg"):
        import psycopg

        # Raised by a loader on the client: no SQLSTATE, unlike every server error.
        return isinstance(orig, psycopg.DataError) and orig.sqlstate is None
    return False


def _decode_lossy(raw: bytes) -> str:
    # Undecodable bytes become lone surrogates, which validation refuses ("not valid UTF-8").
    return raw.decode("utf-8", "surrogateescape")


def tolerate_unconvertible(connection: Connection) -> None:
    """Make ``connection`` read values its driver cannot convert as markers instead of failing
    the fetch: SQLite text that is not UTF-8 keeps its bad bytes as lone surrogates; PostgreSQL
    dates, timestamps and intervals out of Python's range load as :class:`Unconvertible`."""
    dbapi_connection: Any = connection.connection.dbapi_connection
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.text_factory = _decode_lossy
    elif connection.dialect.driver == "psycopg":
        for name in PG_RANGED_TYPES:
            oid = dbapi_connection.adapters.types[name].oid
            dbapi_connection.adapters.register_loader(oid, _tolerant_loader(dbapi_connection, oid))


def _tolerant_loader(dbapi_connection: Any, oid: int) -> Any:
    import psycopg
    from psycopg.adapt import Loader

    # psycopg's C loaders cannot be subclassed: wrap one.
    base = dbapi_connection.adapters.get_loader(oid, psycopg.pq.Format.TEXT)

    class TolerantLoader(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self.base = base(oid, context)

        def load(self, data: Any) -> Any:
            try:
                return self.base.load(data)
            except psycopg.DataError as exc:
                return Unconvertible(str(exc))

    return TolerantLoader
