"""A run's record: its ``runs`` row written from its report (through ``sync.state.runs``), its
outcome after delivery, and its one summary log line."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, Engine

from sync.errors import LeaseLostError, error_line
from sync.reports import RunReport
from sync.run.staging import SnapshotStats
from sync.state.leases import Lease
from sync.state.runs import RunCounts, finish_run
from sync.state.tables import RunStatus

logger = logging.getLogger("sync.runner")


def fill_snapshot(report: RunReport, stats: SnapshotStats) -> None:
    """Copy what computing the snapshot found into the report."""
    report.members = stats.staged
    report.invalid = stats.invalid
    report.duplicates = stats.duplicates
    report.invalid_samples = list(stats.samples)


# runs.error of a run stopped by Ctrl-C or SIGTERM.
INTERRUPTED = "interrupted: the batches in flight finished, the rest stays pending"
ABANDONED = (
    "interrupted twice: stopped at once, the batches in flight abandoned (the next run "
    "resends what may have arrived unacknowledged), the rest stays pending"
)


def status_after_delivery(report: RunReport, *, stopped: bool = False) -> RunStatus:
    """A delivered run's outcome: failed on an error that stopped a destination; when rows are
    left over (pending, rejected, failed), interrupted if the process was asked to stop
    (``stopped``), else partial; else succeeded."""
    if report.error:
        return "failed"
    if any(d.left_pending or d.rejected or d.failed for d in report.destinations):
        if stopped:
            report.error = INTERRUPTED
            return "interrupted"
        return "partial"
    return "succeeded"


def record_run(
    connection: Connection,
    report: RunReport,
    timings: dict[str, float],
    lease: Lease,
    *,
    still_running: bool = False,
) -> None:
    """Record the run's counts and, unless ``still_running`` (its plan commits before any
    send), its outcome; fenced, so that a run that lost its lease leaves the record to its
    successor (``LeaseLostError``)."""
    assert report.run_id is not None
    destinations = report.destinations
    counts = RunCounts(
        members=report.members,
        added=sum(d.added for d in destinations),
        removed=sum(d.removed for d in destinations),
        sent=sum(d.sent for d in destinations),
        rejected=sum(d.rejected for d in destinations),
        invalid=report.invalid,
        duplicates=report.duplicates,
        skipped=sum(d.skipped for d in destinations),
        error=report.error,
        invalid_samples=report.invalid_samples,
    )
    finish_run(
        connection,
        lease,
        report.run_id,
        counts,
        status="running" if still_running else report.status,
        final=not still_running,
        timings=timings,
        deliveries=[d.stored() for d in destinations],
    )


def record_run_safely(
    engine: Engine, report: RunReport, timings: dict[str, float], lease: Lease
) -> None:
    """Record the run in its own transaction. A run that lost its lease records nothing
    and reports itself ``abandoned``, as its successor recorded it. When the state DB
    refuses (down, locked, full) the report says so and the run's row stays `running`
    until its lease expires and the next run marks it `abandoned`."""
    try:
        with engine.begin() as connection:
            record_run(connection, report, timings, lease)
    except LeaseLostError as exc:
        report.status = "abandoned"
        report.error = str(exc)
    except Exception as exc:
        problem = f"the run could not be recorded: {error_line(exc)}"
        logger.error("%s", problem)
        report.status = "failed"
        report.error = f"{report.error}; {problem}" if report.error else problem


def log_summary(report: RunReport) -> None:
    """The run's one summary line: INFO when it went well, ERROR otherwise. Its status, counts
    (summed over destinations, and per destination under ``destinations``) and ``duration_ms``
    are fields of their own in JSON logs."""
    parts = ", ".join(
        f"{d.destination}: +{d.added} -{d.removed} sent {d.sent}"
        + (f" rejected {d.rejected}" if d.rejected else "")
        + (f" trimmed {d.trimmed}" if d.trimmed else "")
        + (f" left {d.left_pending}" if d.left_pending else "")
        for d in report.destinations
    )
    counted = ("added", "removed", "changed", "sent", "rejected", "failed", "left_pending")
    per_destination = [
        {"destination": d.destination, **{c: getattr(d, c) for c in counted}}
        for d in report.destinations
    ]
    fields: dict[str, Any] = {
        "audience": report.key,
        "status": report.status,
        "members": report.members,
        "invalid": report.invalid,
        **{c: sum(getattr(d, c) for d in report.destinations) for c in counted},
        "duration_ms": round(report.seconds * 1000),
        "destinations": per_destination,
    }
    if report.run_id is not None:
        fields["run_id"] = report.run_id
    if len(per_destination) == 1:
        fields["destination"] = per_destination[0]["destination"]
    level = logging.INFO if report.ok else logging.ERROR
    logger.log(
        level,
        "%s: %d members, %d invalid (%s) in %.1fs%s",
        report.status,
        report.members,
        report.invalid,
        parts or "no destinations planned",
        report.seconds,
        f": {report.error}" if report.error else "",
        extra=fields,
    )
