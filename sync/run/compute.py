"""Compute: stage an audience's snapshot (its source query's valid, distinct members) for the
planner, by the fastest path that stages the same rows.

- Same database: when the source is the state database, one ``INSERT … SELECT`` stages it
  (``sync.run.same_database``), unless its values need Python's rendering.
- Streaming: otherwise the query is read in chunks from a source engine and staged chunk by
  chunk (``sync.run.staging``); a real run commits each chunk, fenced by its lease.
- Dry run: always streams, into a private scratch copy (``sync.run.dry_run``), since the
  same-database path would write the state DB.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import Connection, Engine, select

from sync.config import ComputationConfig, Config
from sync.errors import LeaseLostError, RunInterruptedError, SourceError
from sync.run.dry_run import DRY_RUN_ID
from sync.run.plan import drop_staging
from sync.run.same_database import stage_in_database
from sync.run.sources import make_source_engine
from sync.run.stage_table import refresh_statistics
from sync.run.staging import SnapshotStats, stage_from_source
from sync.run.trait_values import TraitColumns
from sync.state.leases import Lease
from sync.state.tables import AUDIENCES

# Called after each chunk of a source query is staged; raises to stop the run.
AfterChunk = Callable[[], None]


def open_source_engine(config: Config, audience: ComputationConfig) -> Engine:
    """An engine on the audience's source (the demo warehouse is created on first use); the
    caller disposes it."""
    source = config.sources[audience.source]
    if source.demo:
        from sync.demo import ensure_demo_warehouse

        ensure_demo_warehouse(source.url)
    return make_source_engine(audience.source, source.url)


def compute_snapshot(
    connection: Connection,
    config: Config,
    audience: ComputationConfig,
    audience_id: int,
    run_id: int,
    lease: Lease,
    after_chunk: AfterChunk,
) -> SnapshotStats:
    """Stage the run's snapshot, each step committed under the run's lease. Staged rows of
    crashed runs are dropped first; a source error or a stop drops this run's too (nothing
    changed) and is raised."""
    drop_staging(connection, audience_id)
    fenced_commit(connection, lease)
    try:
        stats = _stage(connection, config, audience, run_id, after_chunk)
        fenced_commit(connection, lease)
        refresh_statistics(connection)
        connection.commit()
    except (SourceError, RunInterruptedError):
        connection.rollback()
        drop_staging(connection, audience_id)
        fenced_commit(connection, lease)
        raise
    return stats


def _stage(
    connection: Connection,
    config: Config,
    audience: ComputationConfig,
    run_id: int,
    after_chunk: AfterChunk,
) -> SnapshotStats:
    source = config.sources[audience.source]
    if source.url == config.state.url:
        stats = stage_in_database(
            connection,
            run_id,
            audience=audience.name,
            source_name=audience.source,
            query=audience.query,
            traits=audience.extra_traits,
            trait_columns=trait_columns(connection, config, audience),
        )
        if stats is not None:
            return stats  # else values SQL cannot render as Python does: stream them
    return _stream(connection, config, audience, run_id, after_chunk, commit_each_chunk=True)


def compute_dry_snapshot(
    scratch: Connection, config: Config, audience: ComputationConfig, after_chunk: AfterChunk
) -> SnapshotStats:
    """Stage a dry run's snapshot into its scratch copy, uncommitted. It always streams (the
    same-database path would write the state DB); both paths stage the same rows."""
    return _stream(scratch, config, audience, DRY_RUN_ID, after_chunk, commit_each_chunk=False)


def _stream(
    connection: Connection,
    config: Config,
    audience: ComputationConfig,
    run_id: int,
    after_chunk: AfterChunk,
    *,
    commit_each_chunk: bool,
) -> SnapshotStats:
    engine = open_source_engine(config, audience)
    try:
        return stage_from_source(
            engine,
            connection,
            run_id,
            audience=audience.name,
            source_name=audience.source,
            query=audience.query,
            traits=audience.extra_traits,
            chunk_size=config.sources[audience.source].chunk_size,
            commit_each_chunk=commit_each_chunk,
            after_chunk=after_chunk,
            trait_columns=trait_columns(connection, config, audience),
        )
    finally:
        engine.dispose()


def trait_columns(
    connection: Connection | None, config: Config, group: ComputationConfig
) -> TraitColumns | None:
    """A trait group's column rule: its traits may not take a key another computation sends
    to one of its destinations (an audience's key; another trait group's traits as of its last
    run, when there is a state DB ``connection``). None for an audience."""
    if not group.is_trait_group:
        return None
    reserved: dict[str, str] = {}
    for other in config.computations:
        shared = [d for d in other.destinations if d in group.destinations]
        if other.trait_key == group.trait_key or not shared:
            continue
        holder = f'{other.label} "{other.name}" at destination "{shared[0]}"'
        if not other.is_trait_group:
            reserved[other.trait_key] = holder
            continue
        if connection is None:
            continue
        stored = connection.execute(
            select(AUDIENCES.c.exit_value).where(AUDIENCES.c.key == other.trait_key)
        ).scalar()
        for name in json.loads(stored) if stored else {}:
            reserved.setdefault(name, holder)
    return TraitColumns(group.name, reserved)


def fenced_commit(connection: Connection, lease: Lease) -> None:
    """Commit a step of the run only while its lease is still its own."""
    try:
        lease.fence(connection)
    except LeaseLostError:
        connection.rollback()
        raise
    connection.commit()
