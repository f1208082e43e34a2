"""Alert bookkeeping (``alerts_sent``): which alert last told of which computation's failure,
and when, so that every process sharing the state database keeps one repeat interval; and the
status of a computation's previous run (a success after a failure is a recovery).

An alert is *claimed* before it is sent: one statement moves ``sent_at`` to now only when the
interval has passed, so two processes finishing runs at once send it once. A send that fails
gives its claim back, and the next run tries again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, select, update

from sync.clock import state_now
from sync.state.db import insert_ignoring_duplicates
from sync.state.tables import ALERTS_SENT as A
from sync.state.tables import RUNS

# A run that ended one of these ways leaves the computation needing attention; the next
# success is a recovery. `abandoned` (a crashed process) is passed over: the run before it says.
TROUBLE_STATUSES = ("failed", "guarded", "partial")
# `sent_at` of an alert never sent yet.
NEVER = datetime(2000, 1, 1, tzinfo=UTC)


def claim_alert(
    connection: Connection, alert: str, computation: str, event: str, repeat_seconds: float
) -> datetime | None:
    """Claim sending ``alert`` about ``event`` of ``computation``: the state database's time
    of the claim, or None when it was sent less than ``repeat_seconds`` ago (by any
    process). Commit before sending."""
    now = state_now(connection)
    # The row first, as if sent long ago (a row another process inserted is kept): then one
    # conditional UPDATE decides, and its row count is exact on every database, where an
    # INSERT … ON CONFLICT DO NOTHING's is not (psycopg reports -1).
    connection.execute(
        insert_ignoring_duplicates(connection, A).values(
            alert=alert, computation=computation, event=event, sent_at=NEVER
        )
    )
    due = connection.execute(
        update(A)
        .where(
            A.c.alert == alert,
            A.c.computation == computation,
            A.c.event == event,
            A.c.sent_at <= now - timedelta(seconds=repeat_seconds),
        )
        .values(sent_at=now)
    ).rowcount
    return now if due == 1 else None


def release_alert(
    connection: Connection, alert: str, computation: str, event: str, claimed_at: datetime
) -> None:
    """Give back a claim whose alert could not be sent: the next run sends it."""
    connection.execute(
        delete(A).where(
            A.c.alert == alert,
            A.c.computation == computation,
            A.c.event == event,
            A.c.sent_at == claimed_at,
        )
    )


def clear_alerts(connection: Connection, computation: str) -> None:
    """Forget the alerts sent about ``computation`` (it recovered): its next failure alerts
    at once, whatever the repeat interval."""
    connection.execute(delete(A).where(A.c.computation == computation))


def previous_run_status(connection: Connection, audience_id: int, run_id: int) -> str | None:
    """The status of the computation's last finished run before ``run_id`` (neither running
    nor abandoned), if any."""
    return connection.execute(
        select(RUNS.c.status)
        .where(
            RUNS.c.audience_id == audience_id,
            RUNS.c.id < run_id,
            RUNS.c.status.not_in(("running", "abandoned")),
        )
        .order_by(RUNS.c.id.desc())
        .limit(1)
    ).scalar()
