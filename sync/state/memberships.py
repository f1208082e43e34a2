"""Memberships: every status transition of a (computation, destination, member) row outside the
planner's set operations and delivery's acknowledgements, and the rules all of them share —
which rows are pending, what a changed row's status is, what a change resets — so that planning,
delivery and the operator commands cannot drift apart.

One rule for audiences and trait groups: a row is pending when its ``value`` differs from the
``synced_value`` the destination acknowledged (a row never acknowledged: only while its member
is in the result, ``desired``), or when it is ``in_doubt``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, case, false, func, literal, or_, select, true, update

from sync.clock import state_now
from sync.state.tables import FALSE_VALUE, MembershipStatus
from sync.state.tables import MEMBERSHIPS as M

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


def differs(value: Any, desired: Any) -> Any:
    """Whether the destination must be sent ``value`` (for a member that is in the result when
    ``desired``): in doubt, or not what it acknowledged — where nothing was ever acknowledged,
    only for a member in the result (one who left before anything was sent needs nothing)."""
    return or_(
        M.c.in_doubt == true(),
        and_(M.c.synced_value.is_(None), desired),
        and_(M.c.synced_value.is_not(None), M.c.synced_value != value),
    )


def status_for(target: DestinationTarget | None, value: Any, desired: Any) -> Any:
    """The status of a row whose value becomes ``value`` (and its presence ``desired``),
    computed from the row's columns before the change."""
    return status_after_change(target, differs(value, desired))


def leaver_status(target: DestinationTarget | None = None, value: Any = FALSE_VALUE) -> Any:
    """The status of a member who just left (now to hold ``value``): pending while the
    destination may hold something else (delivered, or in doubt), else in sync (nothing of it
    ever got there)."""
    return status_for(target, literal(value) if isinstance(value, str) else value, false())


def pending_condition(audience_id: int, destination: str) -> Any:
    """Rows of one computation and destination whose destination value differs from ``value``."""
    return and_(of_destination(audience_id, destination), differs(M.c.value, M.c.desired))


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
            .where(of, M.c.desired == False, M.c.synced_value.is_not(None))  # noqa: E712
            .values(**again)
        )


def mark_all_exited(
    connection: Connection,
    audience_id: int,
    destination: str | None = None,
    *,
    value: str = FALSE_VALUE,
) -> list[str]:
    """Plan ``value`` (an audience's ``false``, a trait group's nulls) for every current member
    (before retiring), and for every past member whose row still aims at something else that
    the destination acknowledged (a trait group's leaver kept its values with ``on_exit =
    "keep"``), at every destination or one; return the destinations."""
    now = state_now(connection)  # changed_at: one clock for every host
    scope = [M.c.audience_id == audience_id]
    if destination is not None:
        scope.append(M.c.destination == destination)
    holds = and_(M.c.synced_value.is_not(None), M.c.value != value)
    connection.execute(
        update(M)
        .where(*scope, or_(M.c.desired == true(), holds))
        .values(
            desired=False,
            value=value,
            version=M.c.version + 1,
            changed_at=now,
            status=leaver_status(value=value),
            **DELIVERY_RESET,
        )
    )
    rows = connection.execute(select(M.c.destination).where(*scope).distinct())
    return sorted(rows.scalars())


def adopt_destination(connection: Connection, audience_id: int, old: str, new: str) -> int:
    """Hand what an audience's rows at ``old`` know the destination holds to ``new``, which
    delivers to the same place under another name (a renamed destination), before ``old``'s
    rows are forgotten; return how many rows of ``new`` this added or completed.

    A member ``new`` has no row for (one who left around the rename: ``new`` never planned
    it) gets ``old``'s row as it stands, so ``new``'s next plan sends it its ``false`` as
    ``old``'s would have; a row of ``new`` that never had anything acknowledged takes what
    ``old`` had (the destination holds it; in doubt stays in doubt). Rows ``new`` delivered
    itself keep theirs."""
    o = M.alias("o")
    at_old = and_(o.c.audience_id == audience_id, o.c.destination == old)
    at_new = and_(M.c.audience_id == audience_id, M.c.destination == new)
    same_member = and_(o.c.id_kind == M.c.id_kind, o.c.member_id == M.c.member_id)
    # Rows of `new` that never got an acknowledgement: what `old` got there is there.
    completed = connection.execute(
        update(M)
        .where(
            at_new,
            at_old,
            same_member,
            M.c.synced_value.is_(None),
            or_(o.c.synced_value.is_not(None), o.c.in_doubt == true()),
        )
        .values(synced_value=o.c.synced_value, in_doubt=or_(M.c.in_doubt, o.c.in_doubt))
    ).rowcount
    if completed:
        connection.execute(
            update(M)
            .where(at_new, M.c.status.in_(("pending", "in_sync")))
            .values(status=status_after_change(None, differs(M.c.value, M.c.desired)))
        )
    # Members only `old` has: its rows, under the new name (a derived table: MariaDB reads the
    # table it inserts into only so).
    columns = [c.name for c in M.columns]
    rows = (
        select(*[literal(new).label(c) if c == "destination" else o.c[c] for c in columns])
        .where(
            at_old,
            ~select(M.c.member_id).where(at_new, same_member).exists(),
        )
        .subquery("moving")
    )
    added = connection.execute(select(func.count()).select_from(rows)).scalar_one()
    if added:  # (an INSERT … SELECT's row count is -1 on SQLite)
        connection.execute(M.insert().from_select(columns, select(*[rows.c[c] for c in columns])))
    return int(completed) + int(added)
