"""Deliver one audience's pending rows to each of its destinations, filling their reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from sync.config import Config
from sync.delivery.deliverer import Deliverer, RetryPolicy
from sync.destinations import Destination
from sync.messages import AudienceContext
from sync.reports import DestinationReport
from sync.state.leases import Lease
from sync.state.memberships import DestinationTarget, count_status

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
    entries: list[DestinationReport],
    lease: Lease,
    stop: threading.Event,
    progress: ProgressFactory | None = None,
) -> str | None:
    """Deliver to every destination in turn, within one time budget; return the error that
    stopped a destination (bad credentials, unwritable file), if any."""
    deadline = time.monotonic() + policy.time_budget
    by_name = {entry.destination: entry for entry in entries}
    fatal: str | None = None
    for target, destination in pairs:
        if stop.is_set():
            break
        settings = config.destinations[target.name]
        context = AudienceContext(
            installation_id=install,
            audience_id=audience_id,
            key=key,
            destination=target.name,
            mode=settings.mode,
            space_id=settings.space_id,
            namespace=settings.namespace,
            integrations=destination.integrations,
        )
        entry = by_name.setdefault(target.name, DestinationReport(target.name))
        if entry not in entries:
            entries.append(entry)
        stats = Deliverer(
            engine,
            audience_id,
            context,
            destination,
            policy,
            deadline=deadline,
            stop=stop,
            lease=lease,
            progress=progress(key, target.name, entry.pending) if progress else None,
        ).run()
        entry.sent, entry.rejected, entry.trimmed = stats.sent, stats.rejected, stats.trimmed
        with engine.connect() as connection:
            counts = count_status(connection, audience_id, target.name)
        entry.failed = counts.get("failed", 0)
        entry.left_pending = counts.get("pending", 0) + counts.get("rejected", 0)
        entry.error = stats.error
        if stats.fatal:
            fatal = stats.error
    return fatal
