"""Memberships: every status transition of an (audience, destination, member) row outside the
planner's set operations and delivery's acknowledgements, and the rules all of them share —
which rows are pending, what a leaver's status is, what a change resets — so that planning,
delivery and the operator commands cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, case, func, or_, select, true, update

from sync.clock import state_now
from sync.state.tables import MEMBERSHIPS as M
from sync.state.tables import MembershipStatus

# Rows a run still has to deliver: never sent yet, or refused by an earlier run (retried first).
PENDING_STATUSES: tuple[MembershipStatus, ...] = ("pending", "rejected")
# What every change of a row's desired value (or a forced resend) resets: a fresh start for
# delivery's retries.
DELIVERY_RESET: dict[str, Any] = {"attempts": 0, "last_error": None, "next_attempt_at": None}


@dataclass(frozen=True)
class DestinationTarget:
    """A destination as the planner sees it."""

    name: str
    requires_user_id: bool = False


def of_destination(audience_id: int, destination: str) -> Any:
    """Rows of one audience at one destination."""
    return and_(M.c.audience_id == audience_id, M.c.destination == destination)


def is_pending() -> Any:
    """Rows whose status says a run still has to deliver them (``PENDING_STATUSES``)."""
    return M.c.status.in_(PENDING_STATUSES)


def pending_in(counts: Mapping[str, int]) -> int:
    """The pending rows among status counts (``count_status``)."""
    return sum(counts.get(status, 0) for status in PENDING_STATUSES)


def status_after_change(target: DestinationTarget | None, pending_when: Any) -> Any:
    """A row's status after its desired value changed: pending when the destination's value
    now differs (``pending_when``), skipped for anonymous rows at a destination that requires
    a user id, else in sync."""
    if target is not None and target.requires_user_id:
        return case(
            (M.c.id_kind == "anonymous", "skipped"),
            (pending_when, "pending"),
            else_="in_sync",
        )
    return case((pending_when, "pending"), else_="in_sync")


def leaver_status(target: DestinationTarget | None = None) -> Any:
    """The status of a member who just left: pending while the destination may hold its
    ``true`` (delivered, or in doubt), else in sync (it never got there)."""
    return status_after_change(target, or_(M.c.synced == true(), M.c.in_doubt == true()))


def reentrant_status(target: DestinationTarget | None = None) -> Any:
    """The status of a former member who came back: pending unless the destination surely
    holds its ``true`` already (delivered and not in doubt)."""
    return status_after_change(
        target,
        or_(M.c.synced.is_(None), M.c.synced == False, M.c.in_doubt == true()),  # noqa: E712
    )


def pending_condition(audience_id: int, destination: str) -> Any:
    """Rows of one audience and destination whose destination value differs from ``desired``."""
    return and_(
        of_destination(audience_id, destination),
        or_(
            and_(M.c.synced.is_(None), M.c.desired),
            M.c.synced != M.c.desired,
            M.c.in_doubt,
        ),
    )


def count_status(connection: Connection, audience_id: int, destination: str) -> dict[str, int]:
    """Rows per status for one audience and destination."""
    rows = connection.execute(
        select(M.c.status, func.count())
        .where(of_destination(audience_id, destination))
        .group_by(M.c.status)
    ).all()
    return {status: int(count) for status, count in rows}


def count_members(connection: Connection, audience_id: int, destination: str) -> int:
    """Current members (``desired = true``) of an audience at one destination."""
    query = select(func.count()).where(
        of_destination(audience_id, destination), M.c.desired == true()
    )
    return int(connection.execute(query).scalar_one())


# --- transitions -----------------------------------------------------------------------------


def retry_failed(connection: Connection, audience_id: int) -> int:
    """Re-queue the rows that exhausted ``max_attempts``; return how many."""
    result = connection.execute(
        update(M)
        .where(M.c.audience_id == audience_id, M.c.status == "failed")
        .values(status="pending", attempts=0, next_attempt_at=None)
    )
    return int(result.rowcount)


def mark_full_resync(
    connection: Connection,
    audience_id: int,
    target: DestinationTarget,
    now: datetime,
    *,
    include_exited: bool,
) -> None:
    """Make every member pending again (and, with ``include_exited``, every ex-member that was
    ever delivered).

    Rows are marked ``in_doubt`` rather than forgetting ``synced``: a member who leaves before
    the resend is delivered must still get its ``false``, since the destination holds ``true``.
    """
    of = of_destination(audience_id, target.name)
    # A new version gives resent messages new messageIds, so destinations that de-duplicate
    # do not drop the deliberate resend.
    again = {
        "version": M.c.version + 1,
        "in_doubt": True,
        "status": status_after_change(target, true()),
        **DELIVERY_RESET,
    }
    connection.execute(update(M).where(of, M.c.desired == true()).values(**again))
    if include_exited:
        connection.execute(
            update(M)
            .where(of, M.c.desired == False, M.c.synced.is_not(None))  # noqa: E712
            .values(**again)
        )


def mark_all_exited(
    connection: Connection, audience_id: int, destination: str | None = None
) -> list[str]:
    """Plan ``false`` for every current member (before retiring), at every destination or one;
    return the destinations."""
    now = state_now(connection)  # changed_at: one clock for every host
    scope = [M.c.audience_id == audience_id]
    if destination is not None:
        scope.append(M.c.destination == destination)
    connection.execute(
        update(M)
        .where(*scope, M.c.desired == true())
        .values(
            desired=False,
            version=M.c.version + 1,
            changed_at=now,
            status=leaver_status(),
            **DELIVERY_RESET,
        )
    )
    rows = connection.execute(select(M.c.destination).where(*scope).distinct())
    return sorted(rows.scalars())
