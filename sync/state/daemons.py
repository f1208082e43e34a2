"""Daemon heartbeats: who runs ``audience-sync run``, whether it is alive, and when it will
next run each computation.

A daemon inserts its row at start, renews ``heartbeat_at`` every ``HEARTBEAT_SECONDS`` with
the state database's clock (hosts compare it, as they compare leases), rewrites its next run
times with each beat and deletes its row on a clean stop. A row whose heartbeat is older than
``ALIVE_INTERVALS`` beats belongs to a daemon that died; its next runs are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, insert, select, update

from sync.clock import state_now
from sync.state.tables import DAEMON_SCHEDULES as S
from sync.state.tables import DAEMONS as D

# How often a daemon renews its heartbeat row (one small UPDATE; the next run times too).
HEARTBEAT_SECONDS = 10.0
# A daemon is alive while its last heartbeat is younger than this many beats: one missed beat
# (a slow state DB, a busy host) is no death.
ALIVE_INTERVALS = 3
ALIVE_SECONDS = HEARTBEAT_SECONDS * ALIVE_INTERVALS
# Rows of daemons dead this long are deleted when another daemon starts (kept a while so that
# `status` can say which daemon died and when).
DEAD_ROW_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class DaemonView:
    """One ``daemons`` row as ``status`` and the status page show it."""

    id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    seconds_since_heartbeat: float
    alive: bool

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "heartbeat_at": self.heartbeat_at.isoformat(timespec="seconds"),
            "seconds_since_heartbeat": round(self.seconds_since_heartbeat, 1),
            "alive": self.alive,
        }


def register_daemon(
    connection: Connection, daemon_id: str, *, host: str, pid: int, version: str
) -> None:
    """Insert this daemon's row (its first heartbeat); delete rows of long-dead daemons."""
    now = state_now(connection)
    dead = (
        connection.execute(
            select(D.c.id).where(D.c.heartbeat_at < now - timedelta(seconds=DEAD_ROW_SECONDS))
        )
        .scalars()
        .all()
    )
    for dead_id in dead:
        unregister_daemon(connection, dead_id)
    connection.execute(
        insert(D).values(
            id=daemon_id, host=host, pid=pid, version=version, started_at=now, heartbeat_at=now
        )
    )


def beat(connection: Connection, daemon_id: str, next_runs: Mapping[str, datetime]) -> bool:
    """Renew the daemon's heartbeat and replace its next run times (state-clock times, per
    computation key); False when its row is gone (deleted by hand, or pruned as dead)."""
    renewed = connection.execute(
        update(D).where(D.c.id == daemon_id).values(heartbeat_at=state_now(connection))
    ).rowcount
    if not renewed:
        return False
    connection.execute(delete(S).where(S.c.daemon_id == daemon_id))
    if next_runs:
        connection.execute(
            insert(S),
            [
                {"daemon_id": daemon_id, "computation": key, "next_run_at": moment}
                for key, moment in sorted(next_runs.items())
            ],
        )
    return True


def unregister_daemon(connection: Connection, daemon_id: str) -> None:
    """Delete the daemon's rows: it stopped cleanly."""
    connection.execute(delete(S).where(S.c.daemon_id == daemon_id))
    connection.execute(delete(D).where(D.c.id == daemon_id))


def daemon_views(connection: Connection) -> list[DaemonView]:
    """Every daemon row, newest heartbeat first, judged alive or dead by the state DB's clock."""
    now = state_now(connection)
    views = []
    for row in connection.execute(select(D).order_by(D.c.heartbeat_at.desc(), D.c.id)).all():
        age = max(0.0, (now - row.heartbeat_at).total_seconds())
        views.append(
            DaemonView(
                id=row.id,
                host=row.host,
                pid=row.pid,
                version=row.version,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                seconds_since_heartbeat=age,
                alive=age <= ALIVE_SECONDS,
            )
        )
    return views


def scheduled_runs(connection: Connection) -> dict[str, datetime]:
    """When a live daemon will next run each computation (the earliest, when several daemons
    schedule it); computations no live daemon schedules are absent."""
    cutoff = state_now(connection) - timedelta(seconds=ALIVE_SECONDS)
    rows = connection.execute(
        select(S.c.computation, func.min(S.c.next_run_at))
        .join(D, D.c.id == S.c.daemon_id)
        .where(D.c.heartbeat_at >= cutoff)
        .group_by(S.c.computation)
    ).all()
    return {key: moment for key, moment in rows}
