"""The daemon's sweep: deliver an audience's transient leftovers once their backoff expired,
as a run of its own (trigger ``sweep``) that neither computes nor plans."""

from __future__ import annotations

import time

from sync.config import ComputationConfig
from sync.delivery import retry_due
from sync.errors import AudienceSyncError, LeaseHeldError
from sync.reports import DestinationReport, RunReport
from sync.run.context import RunContext
from sync.run.drift import drift_problem
from sync.run.record import record_run_safely, status_after_delivery
from sync.state.audiences import live_audience_of
from sync.state.db import installation_id
from sync.state.memberships import count_members, count_status, pending_in


def sweep_audience(context: RunContext, audience: ComputationConfig) -> RunReport | None:
    """See ``Syncer.sweep``."""
    engine = context.engine
    with engine.begin() as connection:
        audience_id = live_audience_of(connection, audience)
        if audience_id is None or not retry_due(connection, audience_id):
            return None
        if drift_problem(connection, context.config, audience, full=False):
            return None  # its scheduled run reports it
        install = installation_id(connection)
    try:
        lease = context.take_lease(audience_id, audience.title, 0.0)
    except LeaseHeldError:
        return None
    started = time.monotonic()
    report = RunReport(audience.name, audience.trait_key, "running")
    with context.recorded_run(audience, audience_id, "sweep", report, lease, started):
        with context.open_destinations(audience.destinations) as targets:
            with engine.connect() as connection:
                for target, _ in targets:
                    pending = pending_in(count_status(connection, audience_id, target.name))
                    report.destinations.append(DestinationReport(target.name, pending=pending))
                    # The audience as its last plan left it (a sweep computes nothing): the
                    # run's members are not 0, as if the audience had been emptied.
                    members = count_members(connection, audience_id, target.name)
                    report.members = max(report.members, members)
            try:
                error = context.deliver(
                    audience_id,
                    audience.trait_key,
                    install,
                    targets,
                    report.destinations,
                    lease,
                    kind=audience.kind,
                )
                report.error = error or report.error
                report.status = status_after_delivery(report, stopped=context.stop.is_set())
            except AudienceSyncError as exc:
                report.status, report.error = "failed", str(exc)
        timings = {"deliver_seconds": time.monotonic() - started}
        record_run_safely(engine, report, timings, lease)
    return report
