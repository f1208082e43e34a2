"""What a computation would select, without running it: its compiled SQL for the source's
dialect (``show-sql``) and a read-only count and sample (``preview``). Nothing is written."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

from sqlalchemy import Select, TableClause, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.exc import CompileError, SQLAlchemyError
from sqlalchemy.sql.selectable import Alias
from sqlalchemy.sql.visitors import iterate

from sync.config import ComputationConfig, Config
from sync.errors import SourceError, UnknownAudienceError, driver_reason
from sync.run.compute import open_source_engine, source_statement
from sync.run.sources import demo_warehouse_exists, make_source_engine
from sync.run.staging import json_value, source_error

# Rows a preview shows.
DEFAULT_SAMPLE_SIZE = 10


def find_computation(config: Config, name_or_key: str) -> ComputationConfig:
    """The audience or trait group named (or keyed) ``name_or_key``."""
    found = config.find_audience(name_or_key)
    if found is None:
        known = ", ".join(c.name for c in config.computations) or "none defined"
        raise UnknownAudienceError(f'no audience or trait group "{name_or_key}" (defined: {known})')
    return found


def _as_select(config: Config, computation: ComputationConfig) -> Select[Any]:
    statement = source_statement(config, computation)
    if isinstance(statement, str):
        return select(text("*")).select_from(text(f"({statement}) AS computation"))
    return statement


def compiled_sql(
    config: Config, computation: ComputationConfig
) -> tuple[str, list[tuple[str, Any]]]:
    """The SQL the computation runs on its source, in that source's dialect and placeholder
    style, and its bound parameters in the order the placeholders take them (a rule's values
    are never part of the SQL text). An ``in`` array is one placeholder per value, as a run
    expands it."""
    statement = source_statement(config, computation)
    if isinstance(statement, str):
        return statement.strip(), []
    dialect = make_url(config.sources[computation.source].url).get_dialect()()
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.params
    # Positional placeholders take their values in this order, a name repeated per use.
    order = compiled.positiontup if compiled.positiontup is not None else list(params)
    return str(compiled), [(name, params[name]) for name in order]


def _server_dialect(config: Config, computation: ComputationConfig) -> DefaultDialect:
    """The source's dialect as its server reads SQL text; raises ``SourceError``.

    How a quoted literal's backslashes are read is a server setting (PostgreSQL's
    ``standard_conforming_strings``, MySQL's ``NO_BACKSLASH_ESCAPES``) that a dialect learns
    only in ``initialize`` on a connection: a fresh PostgreSQL dialect doubles them, which the
    server (on by default) reads as two. Named placeholders, because a ``format``/``pyformat``
    dialect (psycopg, PyMySQL) doubles every ``%`` for its driver, which un-doubles them only
    when it fills in parameters — and pasted SQL has none."""
    engine = open_source_engine(config, computation)
    try:
        server = engine.dialect
        assert isinstance(server, DefaultDialect)  # every SQLAlchemy dialect is one
        # SQLAlchemy types the attribute as its DBAPI protocol, the argument as a module.
        dialect = type(server)(paramstyle="named", dbapi=cast(ModuleType, server.dbapi))
        with engine.connect() as connection:
            dialect.initialize(connection)
    except SQLAlchemyError as exc:
        raise SourceError(
            f'source "{computation.source}": cannot learn how it reads SQL literals: '
            f"{driver_reason(exc)}"
        ) from None
    finally:
        engine.dispose()
    return dialect


def runnable_sql(config: Config, computation: ComputationConfig) -> str | None:
    """The SQL with its values written in (quoted as the source's server reads them), to paste
    into the database's own client — for reading only: runs bind the values. None when a value
    has no literal form in that dialect; raises ``SourceError`` when the source cannot be
    reached (how it reads literals is the server's setting)."""
    statement = source_statement(config, computation)
    if isinstance(statement, str):
        return statement.strip()
    dialect = _server_dialect(config, computation)
    try:
        return str(
            statement.compile(
                dialect=dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True}
            )
        )
    except (CompileError, NotImplementedError):
        return None


@dataclass(frozen=True)
class Preview:
    """How many rows the computation selects now, and the first few."""

    count: int
    columns: list[str]
    sample: list[dict[str, Any]]


def preview(
    config: Config, computation: ComputationConfig, size: int = DEFAULT_SAMPLE_SIZE
) -> Preview:
    """Run the computation on its source (read-only) and count and sample its rows."""
    statement = _as_select(config, computation)
    engine = open_source_engine(config, computation)
    try:
        with engine.connect() as connection:
            counted = select(func.count()).select_from(statement.subquery("computation"))
            count = int(connection.execute(counted).scalar_one())
            result = connection.execute(statement.limit(size))
            columns = list(result.keys())
            sample = [
                {name: json_value(value) for name, value in zip(columns, row, strict=True)}
                for row in result
            ]
    except SQLAlchemyError as exc:
        raise source_error(computation.title, computation.source, exc) from None
    except SourceError:
        raise
    finally:
        engine.dispose()
    return Preview(count, columns, sample)


def column_problems(config: Config) -> list[str]:
    """Tables and columns that rules read but their source does not have (only for sources
    that can be inspected now; the demo warehouse before it exists cannot)."""
    problems: list[str] = []
    for index, computation in enumerate(config.computations):
        if computation.rules is None:
            continue
        section = "audiences" if not computation.is_trait_group else "traits"
        position = index if section == "audiences" else index - len(config.audiences)
        where = f"{section}[{position}].rules"
        statement = source_statement(config, computation)
        assert not isinstance(statement, str)
        wanted: dict[tuple[str | None, str], set[str]] = {}
        for element in iterate(statement):
            if isinstance(element, TableClause) and not isinstance(element, Alias):
                key = (element.schema, element.name)
                wanted.setdefault(key, set()).update(c.name for c in element.columns)
        source = config.sources[computation.source]
        if source.demo and not demo_warehouse_exists(source.url):
            continue
        try:
            engine = make_source_engine(computation.source, source.url)
        except SourceError:
            continue
        try:
            inspector = inspect(engine)
            for (schema, table), columns in sorted(wanted.items(), key=str):
                if not inspector.has_table(table, schema=schema):
                    problems.append(
                        f'{where}: source "{computation.source}" has no table "{table}"'
                    )
                    continue
                found = {c["name"] for c in inspector.get_columns(table, schema=schema)}
                for name in sorted(columns - found):
                    problems.append(
                        f'{where}: table "{table}" of source "{computation.source}" has no '
                        f'column "{name}"'
                    )
        except SQLAlchemyError:
            continue  # the connection check reports an unreachable source
        finally:
            engine.dispose()
    return list(dict.fromkeys(problems))
