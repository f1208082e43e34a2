"""Operator actions beyond a run: `retry` failed rows and `retire` an orphaned audience."""

from __future__ import annotations

from sqlalchemy import select

from sync.audiences import mark_all_exited, mark_retired, orphaned_audience, retry_failed
from sync.config import Config
from sync.db import installation_id
from sync.delivery import recover_in_flight
from sync.destinations import build_destination
from sync.dispatch import deliver_destinations
from sync.errors import AudienceSyncError
from sync.leases import Lease
from sync.models import AUDIENCES as A
from sync.planner import DestinationTarget, count_status
from sync.reports import DestinationReport
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
    config = syncer.config
    with syncer.engine.begin() as connection:
        audience_id = orphaned_audience(connection, config, key)
        title = connection.execute(select(A.c.name).where(A.c.id == audience_id)).scalar_one()
        install = installation_id(connection)
    lease = Lease(syncer.engine, audience_id, title, syncer.owner, syncer.lease_seconds)
    lease.acquire(wait)
    entries: list[DestinationReport] = []
    try:
        if send_false:
            with syncer.engine.begin() as connection:
                recover_in_flight(connection, audience_id)
                destinations = mark_all_exited(connection, audience_id)
                missing = [d for d in destinations if d not in config.destinations]
                if missing:
                    raise AudienceSyncError(
                        f'audience "{key}" was sent to {", ".join(missing)}, which the config no '
                        "longer defines; add them back to send false, or retire without "
                        "--send-false"
                    )
                for name in destinations:
                    pending = count_status(connection, audience_id, name).get("pending", 0)
                    entries.append(DestinationReport(name, pending=pending))
            pairs = []
            for entry in entries:
                built = build_destination(config, entry.destination)
                pairs.append((DestinationTarget(entry.destination, built.requires_user_id), built))
            try:
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
                for _, destination in pairs:
                    destination.close()
            left = sum(e.left_pending for e in entries)
            if error or left:
                reason = error or f"{left} false values are not delivered yet"
                raise AudienceSyncError(
                    f'audience "{key}" not retired: {reason}; run the command again'
                )
        mark_retired(syncer.engine, audience_id)
    finally:
        lease.release()
    return entries
