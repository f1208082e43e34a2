"""``check --probe``: what a sync would refuse, found without syncing.

Each computation's query runs wrapped so that the database plans it and names its columns but
returns no row (``SELECT * FROM (query) WHERE 1 = 0``: valid on every SQL dialect we know,
and the planners of PostgreSQL, SQLite and MySQL answer it without reading the tables). Its
columns are then checked by the rules a run applies (``query_problem``; for a trait group,
``TraitColumns``), and its key against the state DB (``key_refusal``: retired, or held by the
other kind). Destinations are probed by ``sync.destinations.probe``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, false, select, text
from sqlalchemy.exc import SQLAlchemyError

from sync.config import ComputationConfig, Config
from sync.errors import SourceError
from sync.run.compute import audience_clash, source_statement, trait_columns
from sync.run.sources import demo_warehouse_exists, make_source_engine
from sync.run.staging import query_problem, source_error
from sync.state.audiences import key_refusal


@dataclass(frozen=True)
class QueryProbe:
    """What probing one computation found: its result's columns, or why a sync would refuse it."""

    audience: str
    key: str
    kind: str
    ok: bool
    detail: str
    columns: tuple[str, ...] = ()


def probe_statement(query: str) -> str:
    """``query`` wrapped to return no row. The query goes on lines of its own so that a
    trailing ``-- comment`` cannot swallow the closing parenthesis; a trailing ``;`` goes."""
    body = query.strip().rstrip(";").rstrip()
    return f"SELECT * FROM (\n{body}\n) AS audience_sync_probe WHERE 1 = 0"


def probe_queries(config: Config, state: Connection | None) -> list[QueryProbe]:
    """Probe every configured computation's query and key; ``state`` (None when the state DB
    is not there yet) is only read."""
    results = []
    with _source_engines(config) as engines:
        for computation in config.computations:
            results.append(_probe_one(config, computation, engines, state))
    return results


@contextmanager
def _source_engines(config: Config) -> Iterator[dict[str, Engine | str]]:
    """An engine per source (or why there is none), disposed at the end."""
    engines: dict[str, Engine | str] = {}
    try:
        for name, source in config.sources.items():
            if source.demo and not demo_warehouse_exists(source.url):
                engines[name] = "the demo warehouse is not created yet (`audience-sync demo`)"
                continue
            try:
                engines[name] = make_source_engine(name, source.url)
            except (SourceError, SQLAlchemyError) as exc:
                engines[name] = str(exc)
        yield engines
    finally:
        for engine in engines.values():
            if isinstance(engine, Engine):
                engine.dispose()


def _probe_one(
    config: Config,
    computation: ComputationConfig,
    engines: dict[str, Engine | str],
    state: Connection | None,
) -> QueryProbe:
    label, key = computation.label, computation.trait_key

    def refused(detail: str, columns: tuple[str, ...] = ()) -> QueryProbe:
        return QueryProbe(computation.name, key, computation.kind, False, detail, columns)

    if state is not None and (
        problem := key_refusal(state, computation) or audience_clash(state, config, computation)
    ):
        return refused(problem)
    engine = engines[computation.source]
    if isinstance(engine, str):
        return QueryProbe(computation.name, key, computation.kind, True, f"not probed: {engine}")
    try:
        statement = source_statement(config, computation)
        probe: Any = (
            text(probe_statement(statement))
            if isinstance(statement, str)
            else select(statement.subquery("audience_sync_probe")).where(false())
        )
        with engine.connect() as connection:
            result = connection.execute(probe)
            columns = tuple(result.keys())
            result.close()
            connection.rollback()
    except SQLAlchemyError as exc:
        return refused(str(source_error(computation.title, computation.source, exc)))
    if problem := query_problem(columns, computation.extra_traits):
        return refused(f'{label} "{computation.name}": the query {problem}', columns)
    rule = trait_columns(state, config, computation)
    if rule is not None:
        try:
            traits = [name for name, _ in rule.indexes(columns)]
        except SourceError as exc:
            return refused(str(exc), columns)
        detail = f"columns ok; traits {', '.join(traits)}"
    else:
        detail = f"columns ok ({', '.join(columns)})"
    return QueryProbe(computation.name, key, computation.kind, True, detail, columns)
