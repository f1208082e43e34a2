"""Memberships: the rules every part of a run shares about one (audience, destination, member)
row — which rows are pending, what status counts mean — so that planning, delivery and the
operator commands cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from sync.state.tables import MEMBERSHIPS as M


@dataclass(frozen=True)
class DestinationTarget:
    """A destination as the planner sees it."""

    name: str
    requires_user_id: bool = False


def pending_condition(audience_id: int, destination: str) -> Any:
    """Rows of one audience and destination whose destination value differs from ``desired``."""
    return and_(
        M.c.audience_id == audience_id,
        M.c.destination == destination,
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
        .where(M.c.audience_id == audience_id, M.c.destination == destination)
        .group_by(M.c.status)
    ).all()
    return {status: int(count) for status, count in rows}
