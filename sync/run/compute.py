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
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, Select, select

from sync.config import ComputationConfig, Config, compile_rules
from sync.errors import LeaseLostError, RunInterruptedError, SourceError
from sync.rules import RuleProblems
from sync.run.dry_run import DRY_RUN_ID
from sync.run.plan import drop_staging
from sync.run.same_database import stage_in_database
from sync.run.sources import make_source_engine
from sync.run.stage_table import refresh_statistics
from sync.run.staging import SnapshotStats, stage_from_source
from sync.run.trait_values import TraitColumns, exit_value
from sync.state.audiences import store_exit_value
from sync.state.leases import Lease
from sync.state.tables import AUDIENCES, MEMBERSHIPS, RETIRED_DESTINATIONS

logger = logging.getLogger("sync.runner")

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
    if problem := audience_clash(connection, config, audience):
        raise SourceError(problem)
    try:
        stats = _stage(connection, config, audience, run_id, after_chunk)
        if audience.is_trait_group:
            claim_trait_names(connection, config, audience, audience_id, stats, lease)
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
    # Rules stream (their Select is bound SQL for the source, not text for INSERT … SELECT).
    if source.url == config.state.url and audience.query is not None:
        stats = stage_in_database(
            connection,
            run_id,
            audience=audience.title,
            source_name=audience.source,
            query=audience.query,
            traits=audience.extra_traits,
            trait_columns=trait_columns(connection, config, audience),
        )
        if stats is not None:
            return stats  # else values SQL cannot render as Python does: stream them
    return _stream(connection, config, audience, run_id, after_chunk, commit_each_chunk=True)


def compute_dry_snapshot(
    scratch: Connection,
    state: Connection,
    config: Config,
    audience: ComputationConfig,
    after_chunk: AfterChunk,
) -> SnapshotStats:
    """Stage a dry run's snapshot into its scratch copy, uncommitted. It always streams (the
    same-database path would write the state DB); both paths stage the same rows. Who holds
    which trait name is read from the ``state`` DB (the scratch has no other computation's
    rows), as a run reads it."""
    if problem := audience_clash(state, config, audience):
        raise SourceError(problem)
    columns = trait_columns(state, config, audience)
    state.rollback()  # read only; no transaction held while the source streams
    return _stream(
        scratch, config, audience, DRY_RUN_ID, after_chunk, commit_each_chunk=False, rule=columns
    )


def _stream(
    connection: Connection,
    config: Config,
    audience: ComputationConfig,
    run_id: int,
    after_chunk: AfterChunk,
    *,
    commit_each_chunk: bool,
    rule: TraitColumns | None = None,
) -> SnapshotStats:
    """Stream the source into the staging table; a trait group's columns are checked by
    ``rule`` (default: read on ``connection``)."""
    engine = open_source_engine(config, audience)
    try:
        return stage_from_source(
            engine,
            connection,
            run_id,
            audience=audience.title,
            source_name=audience.source,
            query=source_statement(config, audience),
            traits=audience.extra_traits,
            chunk_size=config.sources[audience.source].chunk_size,
            commit_each_chunk=commit_each_chunk,
            after_chunk=after_chunk,
            trait_columns=rule or trait_columns(connection, config, audience),
        )
    finally:
        engine.dispose()


def source_statement(config: Config, audience: ComputationConfig) -> str | Select[Any]:
    """What runs on the source: the audience's SQL, or its rules compiled (sync.rules)."""
    if audience.query is not None:
        return audience.query
    try:
        return compile_rules(config, audience)
    except RuleProblems as exc:  # checked when the config loaded: a defect if it happens
        raise SourceError(f'{audience.label} "{audience.name}": {exc}') from None


def trait_columns(
    connection: Connection | None, config: Config, group: ComputationConfig
) -> TraitColumns | None:
    """A trait group's column rule: its traits may not take a key another computation sends
    to one of its destinations (an audience's key; another trait group's traits as of its last
    run, when there is a state DB ``connection``). None for an audience."""
    if not group.is_trait_group:
        return None
    rules = group.query is None
    return TraitColumns(group.name, _reserved_names(connection, config, group), rules=rules)


def _reserved_names(
    connection: Connection | None, config: Config, group: ComputationConfig
) -> dict[str, str]:
    """Trait names other computations send to one of ``group``'s destinations -> who: an
    audience's key and the extra traits it carries; another trait group's traits, as its last
    run (or its run now, see ``claim_trait_names``) stored them.

    Who was first is judged per destination: a name this group recorded and has sent to every
    destination it shares with an audience stays this group's (the audience, which came
    later, is refused: ``audience_clash``), unless it is the audience's key and the audience
    has sent to one of them too (its key was there)."""
    reserved: dict[str, str] = {}
    for other in config.computations:
        shared = [d for d in other.destinations if d in group.destinations]
        if other.trait_key == group.trait_key or not shared:
            continue
        holder = f'{other.label} "{other.name}" at destination "{shared[0]}"'
        if not other.is_trait_group:
            names = {other.trait_key, *other.extra_traits}
            if connection is not None:
                names -= _held(connection, group, shared)
                if _sent_to(connection, other, shared):
                    names.add(other.trait_key)
            if other.trait_key in names:
                reserved[other.trait_key] = holder
            for name in other.extra_traits:
                if name in names:
                    reserved.setdefault(name, f"a trait sent with {holder}")
            continue
        if connection is None:  # no state DB (yet): nothing recorded
            continue
        for name in _recorded_names(connection, other.trait_key):
            reserved.setdefault(name, holder)
    if connection is not None:
        reserved.update(_removed_keys(connection, config, group, reserved))
        if not group.allow_key_reuse:
            for name, (_, holder, destination) in _retired_names(connection, group).items():
                if name not in _held(connection, group, [destination]):  # still its own
                    reserved.setdefault(
                        name,
                        f'{holder} at destination "{destination}" (a retired key is not '
                        f"reused: {REUSE.format('the trait group')})",
                    )
    return reserved


def _retired_names(
    connection: Connection, computation: ComputationConfig
) -> dict[str, tuple[str, str, str]]:
    """Names retired computations still hold at one of ``computation``'s destinations, each
    with (the holder's kind, the holder, its destination): a retired audience's key
    (reserved, as it is for audiences: a trait of that name would give the destination's
    true/false trait another meaning) and the traits of a trait group retired without
    ``--send-null`` (its members keep its values there: a new group sending one to some
    users would mix the two). A trait group retired with its nulls delivered holds nothing."""
    columns = (AUDIENCES.c.id, AUDIENCES.c.key, AUDIENCES.c.name, AUDIENCES.c.kind)
    rows = connection.execute(
        select(*columns, AUDIENCES.c.exit_value).where(AUDIENCES.c.retired_at.is_not(None))
    ).all()
    found: dict[str, tuple[str, str, str]] = {}
    for retired_id, key, name, kind, nulls in rows:
        for destination in computation.destinations:
            if kind == "audience":
                if not _sent_to_key(connection, key, [destination]):
                    continue
                found.setdefault(key, (kind, f'the retired audience "{name}"', destination))
                break
            if not nulls or not _values_left(connection, retired_id, nulls, destination):
                continue
            holder = f'the trait group "{name}", retired without --send-null'
            for held in json.loads(nulls):
                found.setdefault(held, (kind, holder, destination))
            break
    # Retired at one destination only (`retire KEY --destination D`): its rows there are gone,
    # what its members hold there is recorded.
    retired = RETIRED_DESTINATIONS
    rows = connection.execute(
        select(AUDIENCES.c.name, AUDIENCES.c.kind, retired.c.destination, retired.c.names)
        .join(AUDIENCES, AUDIENCES.c.id == retired.c.audience_id)
        .where(
            retired.c.destination.in_(computation.destinations),
            AUDIENCES.c.key != computation.trait_key,
        )
        .order_by(retired.c.destination, AUDIENCES.c.key)
    ).all()
    for name, kind, destination, names in rows:
        label = "audience" if kind == "audience" else "trait group"
        how = "" if kind == "audience" else " without --send-null"
        holder = f'the {label} "{name}" that was retired{how}'
        for held in json.loads(names):
            found.setdefault(held, (kind, holder, destination))
    return found


def _values_left(connection: Connection, group_id: int, nulls: str, destination: str) -> bool:
    """Whether a trait group left values at ``destination``: a row acknowledged with other
    than its leaver value ``nulls`` (its traits all null)."""
    query = select(MEMBERSHIPS.c.member_id).where(
        MEMBERSHIPS.c.audience_id == group_id,
        MEMBERSHIPS.c.destination == destination,
        MEMBERSHIPS.c.synced_value.is_not(None),
        MEMBERSHIPS.c.synced_value != nulls,
    )
    return connection.execute(query.limit(1)).first() is not None


REUSE = "set allow_key_reuse = true on {} to reuse it"


def _removed_keys(
    connection: Connection, config: Config, group: ComputationConfig, reserved: dict[str, str]
) -> dict[str, str]:
    """Names held at one of ``group``'s destinations by a computation that no longer sends
    there but has not been retired there: an audience removed from the config (its key), one
    that no longer lists that destination (its key), a trait group removed from the config
    (its recorded traits). The destination holds their values until `retire`, whose
    ``--send-false``/``--send-null`` would overwrite a trait of that name."""
    configured = {c.trait_key: c for c in config.computations}
    rows = connection.execute(
        select(AUDIENCES.c.key, AUDIENCES.c.name, AUDIENCES.c.kind).where(
            AUDIENCES.c.retired_at.is_(None), AUDIENCES.c.key != group.trait_key
        )
    ).all()
    found: dict[str, str] = {}
    for key, name, kind in rows:
        current = configured.get(key)
        # Where it still sends, a configured computation's names are ``_reserved_names``'.
        held = _left_behind(connection, key, current, group.destinations)
        if not held:
            continue
        label = "audience" if kind == "audience" else "trait group"
        flag = "--send-false" if kind == "audience" else "--send-null"
        if current is None:
            why = f"removed from the config; retire it first: `audience-sync retire {key} {flag}`"
        else:
            why = (
                f'it no longer lists "{held[0]}"; retire it there first: '
                f"`audience-sync retire {key} --destination {held[0]} {flag}`"
            )
        holder = f'{label} "{name}" at destination "{held[0]}" ({why})'
        names = [key] if kind == "audience" else sorted(_recorded_names(connection, key))
        for held_name in names:
            if held_name not in reserved:
                found.setdefault(held_name, holder)
    return found


def audience_clash(
    connection: Connection, config: Config, audience: ComputationConfig
) -> str | None:
    """Why an audience may not send its key or the extra traits it carries: a trait group
    holds that name at a destination they share (it recorded it as one of its traits and has
    sent there: it was first). The audience's key is still its own where the audience has
    sent too; a trait it carries it never holds (it may have just started to carry it). None
    for a trait group (its columns are checked as they are staged, ``TraitColumns``)."""
    if audience.is_trait_group:
        return None
    for other in config.computations:
        shared = [d for d in other.destinations if d in audience.destinations]
        if not other.is_trait_group or not shared:
            continue
        for destination in shared:
            held = _held(connection, other, [destination])
            if not held:
                continue
            where = f'trait group "{other.name}" already sends to destination "{destination}"'
            key = audience.trait_key
            if key in held and not _sent_to(connection, audience, [destination]):
                return (
                    f'audience "{audience.name}": its key "{key}" is a trait that {where}; '
                    'set key = "..." on the audience'
                )
            if taken := [name for name in audience.extra_traits if name in held]:
                return (
                    f'audience "{audience.name}": the trait "{taken[0]}" it carries is a '
                    f"trait that {where}; remove it from traits"
                )
    return _removed_group_clash(connection, config, audience) or _retired_clash(
        connection, audience
    )


def _retired_clash(connection: Connection, audience: ComputationConfig) -> str | None:
    """An audience's carried trait named like a retired audience's key, or its key or a
    carried trait named like a trait a group retired without ``--send-null`` left at one of
    its destinations; unless it sets ``allow_key_reuse``. (Its own key, retired before, is
    ``key_refusal``'s.)"""
    if audience.allow_key_reuse:
        return None
    for name, (kind, holder, destination) in _retired_names(connection, audience).items():
        if name == audience.trait_key and kind == "trait":
            what = f'its key "{name}"'
        elif name in audience.extra_traits:
            what = f'the trait "{name}" it carries'
        else:
            continue
        return (
            f'audience "{audience.name}": {what} was a key of {holder} at destination '
            f'"{destination}"; a retired key is not reused: choose another, or '
            f"{REUSE.format('the audience')}"
        )
    return None


def _removed_group_clash(
    connection: Connection, config: Config, audience: ComputationConfig
) -> str | None:
    """An audience's key or carried trait that a trait group still holds at one of its
    destinations, though it is removed from the config, or no longer lists that destination,
    and is not retired there (its `retire --send-null` would overwrite it)."""
    configured = {c.trait_key: c for c in config.computations}
    rows = connection.execute(
        select(AUDIENCES.c.key, AUDIENCES.c.name).where(
            AUDIENCES.c.retired_at.is_(None), AUDIENCES.c.kind == "trait"
        )
    ).all()
    for key, name in rows:
        current = configured.get(key)
        # Where it still sends, a configured group's names are ``audience_clash``'s.
        held = _left_behind(connection, key, current, audience.destinations)
        recorded = _recorded_names(connection, key) if held else set()
        for wanted in (audience.trait_key, *audience.extra_traits):
            if wanted in recorded and not (
                wanted == audience.trait_key and _sent_to(connection, audience, held)
            ):
                if current is None:
                    why = "removed from the config but not retired; retire it first: "
                    command = f"audience-sync retire {key} --send-null"
                else:
                    why = "which it no longer lists, not retired there; retire it there first: "
                    command = f"audience-sync retire {key} --destination {held[0]} --send-null"
                return (
                    f'audience "{audience.name}": "{wanted}" is a trait of trait group '
                    f'"{name}" at destination "{held[0]}", {why}`{command}`'
                )
    return None


def _left_behind(
    connection: Connection,
    key: str,
    current: ComputationConfig | None,
    destinations: list[str],
) -> list[str]:
    """Those of ``destinations`` where the computation ``key`` has rows but no longer sends:
    it is removed from the config (``current`` None) or no longer lists them."""
    return [
        d
        for d in destinations
        if (current is None or d not in current.destinations) and _sent_to_key(connection, key, [d])
    ]


def _held(connection: Connection, group: ComputationConfig, destinations: list[str]) -> set[str]:
    """The trait names ``group`` recorded, if it has sent to every one of ``destinations``."""
    if not all(_sent_to(connection, group, [d]) for d in destinations):
        return set()
    return _recorded_names(connection, group.trait_key)


def _sent_to(
    connection: Connection, computation: ComputationConfig, destinations: list[str]
) -> bool:
    """Whether ``computation`` has memberships at one of ``destinations``: it has planned
    (and so sent, or is sending) there."""
    return _sent_to_key(connection, computation.trait_key, destinations)


def _sent_to_key(connection: Connection, key: str, destinations: list[str]) -> bool:
    """``_sent_to`` of the computation with ``key``."""
    computation_id = select(AUDIENCES.c.id).where(AUDIENCES.c.key == key)
    query = select(MEMBERSHIPS.c.member_id).where(
        MEMBERSHIPS.c.audience_id == computation_id.scalar_subquery(),
        MEMBERSHIPS.c.destination.in_(destinations),
    )
    return connection.execute(query.limit(1)).first() is not None


def _recorded_names(connection: Connection | None, key: str) -> set[str]:
    """The trait names a trait group recorded at its last run (its exit value's keys)."""
    if connection is None:
        return set()
    stored = connection.execute(
        select(AUDIENCES.c.exit_value).where(AUDIENCES.c.key == key)
    ).scalar()
    return set(json.loads(stored)) if stored else set()


def claim_trait_names(
    connection: Connection,
    config: Config,
    group: ComputationConfig,
    group_id: int,
    stats: SnapshotStats,
    lease: Lease,
) -> None:
    """Record the group's trait names (its exit value) and commit, then look again at the
    names other groups recorded: of two groups whose first runs ran at once, each checked
    before the other recorded anything, so at least the later one finds the clash here,
    before anything is planned or sent (``SourceError``). The refused claim is taken back
    (the names recorded before are restored): left recorded, it made the other group, which
    holds the name, fail every later run as well."""
    before = connection.execute(
        select(AUDIENCES.c.exit_value).where(AUDIENCES.c.id == group_id)
    ).scalar()
    store_exit_value(connection, group_id, exit_value(stats.trait_names))
    fenced_commit(connection, lease)
    rule = trait_columns(connection, config, group)
    assert rule is not None  # a trait group's
    for name in stats.trait_names:
        if name in rule.reserved:
            store_exit_value(connection, group_id, before)
            fenced_commit(connection, lease)
            raise SourceError(
                f'trait group "{group.name}": column "{name}" is also the key of '
                f"{rule.reserved[name]}; {rule.rename}"
            )
    dropped = sorted(set(json.loads(before)) - set(stats.trait_names)) if before else []
    if dropped:
        # Not nulled (README: Trait groups): said once, by the run that drops them.
        clear = ", ".join(f"NULL AS {name}" for name in dropped)
        logger.warning(
            'trait group "%s": %s %s left its %s; the destination keeps what its members were '
            "sent of them%s",
            group.name,
            "trait(s)" if group.query is None else "column(s)",
            ", ".join(f'"{name}"' for name in dropped),
            "rules" if group.query is None else "query",
            "" if group.query is None else f" (return {clear} for one run to clear them)",
        )


def fenced_commit(connection: Connection, lease: Lease) -> None:
    """Commit a step of the run only while its lease is still its own."""
    try:
        lease.fence(connection)
    except LeaseLostError:
        connection.rollback()
        raise
    connection.commit()
