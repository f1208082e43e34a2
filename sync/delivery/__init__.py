"""Delivery: send an audience's pending rows to each of its destinations, filling their reports.

``deliverer`` runs the loop for one destination; ``batches`` encodes and packs rows,
``sending`` sends a batch with retries and split-on-reject, ``ledger`` holds every state DB
statement delivery makes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from sync.config import ComputationConfig, Config
from sync.delivery.deliverer import Deliverer
from sync.delivery.ledger import prune_deliveries, recover_in_flight, retry_due
from sync.delivery.sending import NO_HOOKS, DeliveryHooks, RetryPolicy
from sync.destinations import Destination
from sync.messages import AudienceContext, ComputationClass
from sync.reports import DestinationReport
from sync.state.leases import Lease
from sync.state.memberships import DestinationTarget, count_status

__all__ = [
    "DeliveryHooks",
    "ProgressFactory",
    "RetryPolicy",
    "deliver_destinations",
    "prune_deliveries",
    "recover_in_flight",
    "retry_due",
]

ProgressFactory = Callable[[str, str, int], Callable[[int], None]]


def deliver_destinations(
    engine: Engine,
    config: Config,
    policy: RetryPolicy,
    *,
    audience_id: int,
    key: str,
    install: str,
    pairs: list[tuple[DestinationTarget, Destination]],
    kind: ComputationClass = "audience",
    computation: ComputationConfig | None = None,
    entries: list[DestinationReport],
    lease: Lease,
    stop: threading.Event,
    progress: ProgressFactory | None = None,
    hooks: DeliveryHooks = NO_HOOKS,
) -> str | None:
    """Deliver to every destination in turn, within one time budget, counting into its entry
    (added to ``entries`` if missing); return the error that stopped a destination (bad
    credentials, unwritable file), if any. ``computation``: its configuration, when it has
    one (per-destination settings such as ``external_audience_id``)."""
    deadline = time.monotonic() + policy.time_budget
    by_name = {entry.destination: entry for entry in entries}
    fatal: str | None = None
    for target, destination in pairs:
        if stop.is_set():
            # Asked to stop: the destinations not reached yet are counted, not delivered.
            entry = by_name.setdefault(target.name, DestinationReport(target.name))
            if entry not in entries:
                entries.append(entry)
            _count_leftovers(engine, audience_id, entry)
            continue
        settings = config.destinations[target.name]
        own = computation.settings_for(target.name) if computation else None
        context = AudienceContext(
            installation_id=install,
            audience_id=audience_id,
            key=key,
            destination=target.name,
            mode=settings.mode,
            space_id=settings.space_id,
            namespace=settings.namespace,
            integrations=destination.integrations,
            computation_class=kind,
            external_audience_id=(own.external_audience_id or "") if own else "",
            audience_settings=own.audience_settings if own else None,
        )
        entry = by_name.setdefault(target.name, DestinationReport(target.name))
        if entry not in entries:
            entries.append(entry)
        fatal = (
            Deliverer(
                engine,
                audience_id,
                context,
                destination,
                policy,
                entry,
                deadline=deadline,
                stop=stop,
                lease=lease,
                progress=progress(key, target.name, entry.pending) if progress else None,
                hooks=hooks,
                log=config.state.delivery_ledger,
            ).run()
            or fatal
        )
        _count_leftovers(engine, audience_id, entry)
    return fatal


def _count_leftovers(engine: Engine, audience_id: int, entry: DestinationReport) -> None:
    """Fill ``entry``'s ``failed`` and ``left_pending`` from the state DB."""
    with engine.connect() as connection:
        counts = count_status(connection, audience_id, entry.destination)
    entry.failed = counts.get("failed", 0)
    entry.left_pending = counts.get("pending", 0) + counts.get("rejected", 0)
