"""Run records: a run is started (``running``), finished with its counts and outcome, or marked
``abandoned`` by the next holder of its audience's lease. Every write of a run's own record is
fenced by its lease, so a run that lost its lease leaves the record to its successor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, func, insert, select, update

from sync.clock import state_now
from sync.state.tables import DELIVERY_BATCHES as L
from sync.state.tables import RUN_DELIVERIES, RUNS, RunTrigger

ABANDONED_ERROR = (
    "its process stopped or stalled before finishing (lease expired; another run took over)"
)


class Fence(Protocol):
    """What fences a run's writes: its lease (``sync.state.leases.Lease``)."""

    def fence(self, connection: Connection) -> None:
        """Raise unless the lease is still the run's; keep it until the transaction ends."""


@dataclass(frozen=True)
class RunCounts:
    """The counts of a run as its ``runs`` row stores them."""

    members: int = 0
    added: int = 0
    removed: int = 0
    sent: int = 0
    rejected: int = 0
    invalid: int = 0
    duplicates: int = 0
    skipped: int = 0
    error: str | None = None
    invalid_samples: list[str] = field(default_factory=list)


def start_run(connection: Connection, audience_id: int, *, owner: str, trigger: RunTrigger) -> int:
    """Insert a ``running`` run of the audience; return its id. The caller fences the
    transaction with the lease it holds."""
    result = connection.execute(
        insert(RUNS).values(
            audience_id=audience_id,
            trigger=trigger,
            status="running",
            owner=owner,
            started_at=state_now(connection),
            ledger_from=select(func.coalesce(func.max(L.c.id), 0)).scalar_subquery(),
            **_row_values(RunCounts()),
        )
    )
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def finish_run(
    connection: Connection,
    lease: Fence,
    run_id: int,
    counts: RunCounts,
    *,
    status: str,
    final: bool,
    timings: Mapping[str, float],
    deliveries: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Record a run's counts and ``status``; when ``final``, its finish time and one
    ``run_deliveries`` row per destination too (else the run goes on: its planned counts commit
    with the plan). Fenced first: a run that lost its lease raises ``LeaseLostError`` and
    writes nothing. Only a run still ``running`` is updated, so an ``abandoned`` mark stays."""
    # Before touching `runs`: a takeover locks the lease row, then marks `runs`; taking the
    # locks in the same order cannot deadlock.
    lease.fence(connection)
    values = _row_values(counts)
    connection.execute(
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.status == "running")
        .values(
            status=status,
            finished_at=state_now(connection) if final else None,
            **values,
            **timings,
        )
    )
    if final:
        table = RUN_DELIVERIES
        connection.execute(table.delete().where(table.c.run_id == run_id))
        if deliveries:
            connection.execute(table.insert(), [{"run_id": run_id, **d} for d in deliveries])


def _row_values(counts: RunCounts) -> dict[str, Any]:
    """``counts`` as ``runs`` columns (no samples: SQL NULL, not an empty JSON list)."""
    return {**asdict(counts), "invalid_samples": counts.invalid_samples or None}


def abandon_runs(connection: Connection, audience_id: int, now: datetime) -> int:
    """Mark the audience's runs still ``running`` abandoned; return how many. Only the new
    holder of the audience's lease calls this: their processes crashed or lost the lease, and
    their own writes are fenced, so the mark stays."""
    running = connection.execute(
        select(RUNS.c.id, RUNS.c.ledger_from)
        .where(RUNS.c.audience_id == audience_id, RUNS.c.status == "running")
        .order_by(RUNS.c.id)
    ).all()
    for at, (run_id, start) in enumerate(running):
        counted = {}
        if start is not None:
            end = running[at + 1].ledger_from if at + 1 < len(running) else None
            counted = _ledger_counts(connection, audience_id, start, end)
        connection.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status == "running")
            .values(status="abandoned", finished_at=now, error=ABANDONED_ERROR, **counted)
        )
    return len(running)


def _ledger_counts(
    connection: Connection, audience_id: int, start: int, end: int | None
) -> dict[str, int]:
    """What a run whose ledger rows are ids ``start`` < id <= ``end`` sent: members
    acknowledged and rejected (``member_count``: a member in ``mode = "both"`` has two
    messages, which fare together). One pass of the primary key's range, a row per batch
    outcome, nothing expanded. Empty when the ledger holds none (off, or pruned): the counts
    stay."""
    query = (
        select(L.c.outcome, func.sum(L.c.member_count))
        .where(
            L.c.id > start,
            L.c.audience_id == audience_id,
            L.c.outcome.in_(("acknowledged", "rejected")),
        )
        .group_by(L.c.outcome)
    )
    if end is not None:
        query = query.where(L.c.id <= end)
    counts: dict[str, int] = {}
    for outcome, count in connection.execute(query):
        counts["sent" if outcome == "acknowledged" else "rejected"] = int(count or 0)
    return counts


def run_reason(error: str | None, deliveries: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a run ended as it did, in one line: its own error, then each destination's reason
    (``run_deliveries``: what was left over, and the error that left it) where that says
    more, e.g. ``segment: 250 left pending: destination "segment": ConnectError: …``."""
    parts = [error] if error else []
    for delivery in deliveries:
        counts = ", ".join(
            f"{delivery[column]} {label}"
            for column, label in (
                ("left_pending", "left pending"),
                ("rejected", "rejected"),
                ("failed", "failed"),
            )
            if delivery[column]
        )
        reason = delivery["error"] if delivery["error"] != error else None
        if counts or reason:
            said = ": ".join(text for text in (counts, reason) if text)
            parts.append(f"{delivery['destination']}: {said}")
    return "; ".join(parts) or None
