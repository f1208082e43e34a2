"""Read-only views for the daemon's metrics and status page (sync.monitor): per computation
and destination counts, the last successful run, and recent runs for the charts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, case, func, select

from sync.state.memberships import is_pending
from sync.state.tables import AUDIENCES as A
from sync.state.tables import MEMBERSHIPS as M
from sync.state.tables import RUNS as R

# A run's `members` is the snapshot it computed; a run that failed before computing, or a
# sweep (which computes nothing), records 0 there, which is not the audience's size.
_MEMBERS_KNOWN = ("succeeded", "partial", "guarded")


@dataclass(frozen=True)
class DestinationCounts:
    """Members, pending and failed rows of one computation at one destination."""

    computation: str
    destination: str
    members: int
    pending: int
    failed: int


@dataclass(frozen=True)
class RunPoint:
    """One run of a computation, as a chart plots it."""

    run_id: int
    status: str
    started_at: datetime
    members: int | None  # None: the run did not compute the audience (a sweep, a failure)
    sent: int


def destination_counts(connection: Connection) -> list[DestinationCounts]:
    """Members, pending and failed rows per live (not retired) computation and destination."""
    rows = connection.execute(
        select(
            A.c.key,
            M.c.destination,
            func.sum(case((M.c.desired, 1), else_=0)),
            func.sum(case((is_pending(), 1), else_=0)),
            func.sum(case((M.c.status == "failed", 1), else_=0)),
        )
        .join(A, A.c.id == M.c.audience_id)
        .where(A.c.retired_at.is_(None))
        .group_by(A.c.key, M.c.destination)
        .order_by(A.c.key, M.c.destination)
    ).all()
    return [
        DestinationCounts(k, d, int(m or 0), int(p or 0), int(f or 0)) for k, d, m, p, f in rows
    ]


def last_successes(connection: Connection) -> dict[str, datetime]:
    """When each computation's last ``succeeded`` run finished."""
    rows = connection.execute(
        select(A.c.key, func.max(R.c.finished_at))
        .join(A, A.c.id == R.c.audience_id)
        .where(R.c.status == "succeeded", R.c.finished_at.is_not(None))
        .group_by(A.c.key)
    ).all()
    return {key: moment for key, moment in rows}


def recent_runs(
    connection: Connection, limit: int, key: str | None = None
) -> dict[str, list[RunPoint]]:
    """The last ``limit`` finished runs of each computation (or of ``key``), oldest first."""
    numbered = (
        select(
            A.c.key,
            R.c.id,
            R.c.status,
            R.c.trigger,
            R.c.started_at,
            R.c.members,
            R.c.sent,
            func.row_number().over(partition_by=R.c.audience_id, order_by=R.c.id.desc()).label("n"),
        )
        .join(A, A.c.id == R.c.audience_id)
        .where(R.c.status != "running")
    )
    if key is not None:
        numbered = numbered.where(A.c.key == key)
    sub = numbered.subquery()
    rows = connection.execute(
        select(sub).where(sub.c.n <= limit).order_by(sub.c.key, sub.c.id)
    ).all()
    series: dict[str, list[RunPoint]] = {}
    for row in rows:
        known = row.status in _MEMBERS_KNOWN and row.trigger != "sweep"
        series.setdefault(row.key, []).append(
            RunPoint(row.id, row.status, row.started_at, row.members if known else None, row.sent)
        )
    return series
