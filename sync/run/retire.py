"""Retiring: an audience removed from the config (its key stays reserved), or an audience's
presence at a destination it no longer lists; ``on_removed = "retire"`` for every audience
removed from the config. Each first sends ``false`` to the members when asked, under the
audience's lease, through the same delivery as a run."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sync.delivery import recover_in_flight
from sync.errors import AudienceSyncError, LeaseHeldError
from sync.reports import DestinationReport, RunReport
from sync.run.context import RunContext
from sync.run.drift import (
    Orphan,
    moved_endpoints,
    orphans,
    recorded_destinations,
    rename_sources,
    twin_destination,
)
from sync.run.plan import retirement_problem
from sync.state.audiences import (
    audience_leaving_destination,
    audience_title,
    exit_value_of,
    forget_destination,
    mark_retired,
    orphaned_audience,
)
from sync.state.db import installation_id
from sync.state.leases import Lease
from sync.state.memberships import count_status, mark_all_exited, pending_in

logger = logging.getLogger("sync.retire")


def retire_audience(
    context: RunContext,
    name: str,
    *,
    destination: str | None,
    send_false: bool,
    wait: float,
    send_null: bool = False,
    time_budget: float | None = None,
) -> list[DestinationReport]:
    """See ``Syncer.retire``; ``time_budget`` shortens the delivery of false or nulls."""
    with context.engine.begin() as connection:
        if destination is None:
            audience_id, key = orphaned_audience(connection, context.config, name), name
        else:
            audience_id, key = audience_leaving_destination(
                connection, context.config, name, destination
            )
        title = audience_title(connection, audience_id)
        kind, exit_value = exit_value_of(connection, audience_id)
    if kind == "trait" and send_false:
        raise AudienceSyncError(f'"{key}" is a trait group: retire it with --send-null')
    if kind == "audience" and send_null:
        raise AudienceSyncError(f'"{key}" is an audience: retire it with --send-false')
    label = "audience" if kind == "audience" else "trait group"
    label_title = f'{label} "{key}"'
    lease = context.take_lease(audience_id, f'{label} "{title}"', wait)
    try:
        send = send_false or send_null
        entries = (
            _send_false(context, lease, audience_id, key, destination, time_budget) if send else []
        )
        if destination is None:
            mark_retired(context.engine, audience_id)
        else:
            heir = twin_destination(context.config, key, destination)
            if heir is not None:
                # What an unfinished delivery there may have handed over is in doubt: handed
                # over so, the heir resends it.
                with context.engine.begin() as connection:
                    lease.fence(connection)
                    recover_in_flight(connection, audience_id, destination)
            # What its members still hold there stays reserved: its key; a trait group's
            # traits (its leaver value's keys), unless their nulls were just delivered.
            held = [key] if kind == "audience" else ([] if send else json.loads(exit_value))
            handed = forget_destination(context.engine, audience_id, destination, heir, held=held)
            if heir is not None:
                logger.warning(
                    '%s: destination "%s" delivers where "%s" does: %d member(s) recorded at '
                    '"%s" are now recorded at "%s" (its next sync sends those who left %s)',
                    label_title,
                    destination,
                    heir,
                    handed,
                    destination,
                    heir,
                    "their false" if kind == "audience" else "their nulls",
                )
    finally:
        lease.release()
    return entries


def _send_false(
    context: RunContext,
    lease: Lease,
    audience_id: int,
    key: str,
    destination: str | None,
    time_budget: float | None = None,
) -> list[DestinationReport]:
    """Plan and deliver ``false`` (a trait group's nulls) to every current member (at one
    destination, or all); raise unless every one was delivered."""
    with context.engine.begin() as connection:
        install = installation_id(connection)
        recover_in_flight(connection, audience_id)
        kind, value = exit_value_of(connection, audience_id)
        what, flag = ("false", "--send-false") if kind == "audience" else ("nulls", "--send-null")
        label = "audience" if kind == "audience" else "trait group"
        names = mark_all_exited(connection, audience_id, destination, value=value)
        missing = [d for d in names if d not in context.config.destinations]
        if missing:
            raise AudienceSyncError(
                f'{label} "{key}" was sent to {", ".join(missing)}, which the config no '
                f"longer defines; add them back to send {what}, or retire without {flag}"
            )
        twin = twin_destination(context.config, key, destination) if destination else None
        if twin is not None:
            raise AudienceSyncError(
                f'{label} "{key}": destination "{destination}" delivers where "{twin}", which '
                f'it still lists, does: {what} there would undo what "{twin}" holds; retire '
                f'without {flag}: its rows are handed to "{twin}", which sends those who '
                f"left their {what}"
            )
        moved = moved_endpoints(connection, context.config, audience_id, names)
        if moved:
            # `false` at the new endpoint would leave the old one holding `true`, and retiring
            # would forget that it does.
            shown = ", ".join(f'"{name}"' for name in moved)
            raise AudienceSyncError(
                f'{label} "{key}": destination {shown} now points at another endpoint than '
                "the one its members were sent to; point it back at that endpoint to send "
                f"{what} there, or retire without {flag}"
            )
        entries = [
            DestinationReport(n, pending=pending_in(count_status(connection, audience_id, n)))
            for n in names
        ]
    with context.open_destinations(names) as targets:
        error = context.deliver(
            audience_id, key, install, targets, entries, lease, kind=kind, time_budget=time_budget
        )
    left = sum(e.left_pending for e in entries)
    if error or left:
        why = next((e.error for e in entries if e.error), None)
        reason = error or f"{left} {what} are not delivered yet" + (f" ({why})" if why else "")
        raise AudienceSyncError(
            f'{label} "{key}" not retired: {reason}; retiring again sends the rest'
        )
    return entries


def retire_orphans(
    context: RunContext,
    *,
    force: bool,
    time_budget: float | None = None,
    start_after: str | None = None,
) -> list[RunReport]:
    """See ``Syncer.retire_orphans``; none is started once the process is asked to stop or
    ``time_budget`` has passed: they are left to a later retire, which passes the last key
    this one tried as ``start_after`` (the order turns, so an orphan whose destination hangs
    for the whole budget does not keep the others from ever being tried)."""
    until = None if time_budget is None else time.monotonic() + time_budget
    defaults = context.config.defaults
    with context.engine.connect() as connection:
        found = orphans(connection, context.config)
        # An orphan a configured computation looks renamed from stays: that run is refused,
        # naming `key = "old"` as the way to keep the old key's members.
        renamed = {
            old: computation
            for computation in context.config.computations
            for old in rename_sources(connection, context.config, computation)
        }
        problems = {
            o.key: retirement_problem(
                connection,
                o.audience_id,
                recorded_destinations(connection, o.audience_id),
                key=o.key,
                name=o.name,
                max_removal_ratio=defaults.max_removal_ratio,
                min_members=defaults.guard_min_members,
                kind=o.kind,
                command_line=context.config.command_line,
            )
            for o in found
        }
    if start_after is not None:
        found = [o for o in found if o.key > start_after] + [
            o for o in found if o.key <= start_after
        ]
    reports = []
    for orphan in found:
        if context.stop.is_set() or (until is not None and time.monotonic() > until):
            break
        problem = problems[orphan.key]
        successor = renamed.get(orphan.key)
        if successor is not None:
            label = "audience" if orphan.kind == "audience" else "trait group"
            flag = "--send-false" if orphan.kind == "audience" else "--send-null"
            error = (
                f'{label} "{orphan.key}" was removed from the config but not retired '
                f'(on_removed = "retire"): "{successor.trait_key}" looks like it renamed; set '
                f'key = "{orphan.key}" on "{successor.name}" to keep the key, or run '
                f"`audience-sync retire {orphan.key} {flag}`"
            )
            reports.append(_report(orphan, "guarded", error=error))
            continue
        if problem and not force:
            reports.append(_report(orphan, "guarded", error=problem))
            continue
        try:
            entries = retire_audience(
                context,
                orphan.key,
                destination=None,
                send_false=orphan.kind == "audience",
                send_null=orphan.kind == "trait",
                wait=0.0,
                time_budget=time_budget,
            )
        except LeaseHeldError as exc:
            reports.append(_report(orphan, "busy", error=str(exc)))
        except AudienceSyncError as exc:
            reports.append(_report(orphan, "failed", error=str(exc)))
        else:
            reports.append(_report(orphan, "retired", destinations=entries))
    return reports


def _report(orphan: Orphan, status: str, **fields: Any) -> RunReport:
    """An orphan's report."""
    return RunReport(orphan.name, orphan.key, status, kind=orphan.kind, **fields)
