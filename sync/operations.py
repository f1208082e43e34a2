"""Operator actions beyond a run: `retry` failed rows, `retire` an orphaned audience or a
destination an audience left, and `on_removed = "retire"` for audiences removed from the config."""

from __future__ import annotations

from sqlalchemy import Connection, select

from sync.audiences import (
    audience_leaving_destination,
    forget_destination,
    mark_all_exited,
    mark_retired,
    orphaned_audience,
    retry_failed,
)
from sync.config import Config
from sync.db import installation_id
from sync.delivery import recover_in_flight
from sync.destinations import build_destination
from sync.dispatch import deliver_destinations
from sync.drift import Orphan, moved_endpoints, orphans, recorded_destinations
from sync.errors import AudienceSyncError, LeaseHeldError
from sync.leases import Lease
from sync.models import AUDIENCES as A
from sync.planner import (
    DestinationPlan,
    DestinationTarget,
    count_members,
    count_status,
    removal_problem,
)
from sync.reports import DestinationReport, RunReport
from sync.runner import Syncer


def retry_audience(syncer: Syncer, name: str) -> int:
    """Re-queue an audience's ``failed`` rows for the next run; return how many."""
    config: Config = syncer.config
    audience = config.find_audience(name)
    key = audience.trait_key if audience else name
    with syncer.engine.begin() as connection:
        audience_id = connection.execute(select(A.c.id).where(A.c.key == key)).scalar()
        if audience_id is None:
            raise AudienceSyncError(f'no audience "{name}" in the state database')
        return retry_failed(connection, audience_id)


def retire_audience(
    syncer: Syncer, key: str, *, send_false: bool, wait: float = 0.0
) -> list[DestinationReport]:
    """Retire an audience that left the config, first sending ``false`` to its members when
    asked; its key stays reserved."""
    with syncer.engine.begin() as connection:
        audience_id = orphaned_audience(connection, syncer.config, key)
    lease = _lease(syncer, audience_id, wait)
    try:
        entries = _send_false(syncer, lease, audience_id, key) if send_false else []
        mark_retired(syncer.engine, audience_id)
    finally:
        lease.release()
    return entries


def retire_destination(
    syncer: Syncer, name: str, destination: str, *, send_false: bool, wait: float = 0.0
) -> list[DestinationReport]:
    """End an audience's presence at a destination it no longer lists (the audience may stay
    configured): send ``false`` to its members there when asked, then delete those rows so
    `status` and the drift warning no longer count them."""
    with syncer.engine.begin() as connection:
        audience_id, key = audience_leaving_destination(
            connection, syncer.config, name, destination
        )
    lease = _lease(syncer, audience_id, wait)
    try:
        entries = (
            _send_false(syncer, lease, audience_id, key, destination=destination)
            if send_false
            else []
        )
        forget_destination(syncer.engine, audience_id, destination)
    finally:
        lease.release()
    return entries


def _lease(syncer: Syncer, audience_id: int, wait: float) -> Lease:
    with syncer.engine.connect() as connection:
        title = connection.execute(select(A.c.name).where(A.c.id == audience_id)).scalar_one()
    lease = Lease(syncer.engine, audience_id, title, syncer.owner, syncer.lease_seconds)
    lease.acquire(wait)
    return lease


def _send_false(
    syncer: Syncer, lease: Lease, audience_id: int, key: str, *, destination: str | None = None
) -> list[DestinationReport]:
    """Plan and deliver ``false`` to every current member (at one destination, or all); raise
    unless every one was delivered."""
    config = syncer.config
    entries: list[DestinationReport] = []
    with syncer.engine.begin() as connection:
        install = installation_id(connection)
        recover_in_flight(connection, audience_id)
        destinations = mark_all_exited(connection, audience_id, destination)
        missing = [d for d in destinations if d not in config.destinations]
        if missing:
            raise AudienceSyncError(
                f'audience "{key}" was sent to {", ".join(missing)}, which the config no '
                "longer defines; add them back to send false, or retire without --send-false"
            )
        moved = moved_endpoints(connection, config, audience_id, destinations)
        if moved:
            # `false` at the new endpoint would leave the old one holding `true`, and retiring
            # would forget that it does.
            shown = ", ".join(f'"{name}"' for name in moved)
            raise AudienceSyncError(
                f'audience "{key}": destination {shown} now points at another endpoint than '
                "the one its members were sent to; point it back at that endpoint to send "
                "false there, or retire without --send-false"
            )
        for name in destinations:
            pending = count_status(connection, audience_id, name).get("pending", 0)
            entries.append(DestinationReport(name, pending=pending))
    pairs = []
    try:
        for entry in entries:
            built = build_destination(config, entry.destination)
            pairs.append((DestinationTarget(entry.destination, built.requires_user_id), built))
        error = deliver_destinations(
            syncer.engine,
            config,
            syncer.policy,
            audience_id=audience_id,
            key=key,
            install=install,
            pairs=pairs,
            entries=entries,
            lease=lease,
            stop=syncer.stop,
        )
    finally:
        for _, built in pairs:
            built.close()
    left = sum(e.left_pending for e in entries)
    if error or left:
        reason = error or f"{left} false values are not delivered yet"
        raise AudienceSyncError(f'audience "{key}" not retired: {reason}; run the command again')
    return entries


# --- on_removed = "retire" -------------------------------------------------------------------


def retire_orphans(syncer: Syncer, *, force: bool) -> list[RunReport]:
    """Send ``false`` to the members of every audience removed from the config and retire it,
    one report each; the removal guard applies as to any run (``force`` passes it)."""
    with syncer.engine.connect() as connection:
        found = orphans(connection, syncer.config)
        problems = {o.key: _orphan_guard_problem(connection, syncer.config, o) for o in found}
    reports = []
    for orphan in found:
        problem = problems[orphan.key]
        if problem and not force:
            reports.append(RunReport(orphan.name, orphan.key, "guarded", error=problem))
            continue
        try:
            entries = retire_audience(syncer, orphan.key, send_false=True)
        except LeaseHeldError as exc:
            reports.append(RunReport(orphan.name, orphan.key, "busy", error=str(exc)))
        except AudienceSyncError as exc:
            reports.append(RunReport(orphan.name, orphan.key, "failed", error=str(exc)))
        else:
            reports.append(RunReport(orphan.name, orphan.key, "retired", destinations=entries))
    return reports


def _orphan_guard_problem(connection: Connection, config: Config, orphan: Orphan) -> str | None:
    """The removal guard's verdict on sending ``false`` to all of an orphan's members: the
    same rule as a run's (``removal_problem``), with the [defaults] settings."""
    ratio = config.defaults.max_removal_ratio
    for destination in recorded_destinations(connection, orphan.audience_id):
        current = count_members(connection, orphan.audience_id, destination)
        plan = DestinationPlan(destination, current=current, removed=current)
        guarded = removal_problem(
            plan,
            current,
            max_removal_ratio=ratio,
            min_members=config.defaults.guard_min_members,
            audience_name=orphan.name,
        )
        if guarded:
            return (
                f'audience "{orphan.key}" was removed from the config, and on_removed = "retire" '
                f'would send false to all its {current} members at destination "{destination}", '
                f"more than max_removal_ratio {ratio:.0%}; run `audience-sync sync --force` to "
                f"retire it anyway, or `audience-sync retire {orphan.key} --send-false`"
            )
    return None
