"""Row-level leases: one process at a time runs an audience; a crashed holder's lease expires."""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, or_, select, update

from sync.errors import LeaseHeldError, LeaseLostError
from sync.models import AUDIENCES as A
from sync.models import RUNS, utcnow

# How long a lease lives without renewal. A crashed holder blocks its audience this long.
DEFAULT_LEASE_SECONDS = 60.0
# How often `--wait` polls for a held lease.
LEASE_POLL_SECONDS = 0.5


def new_owner_id() -> str:
    """A lease owner id naming this host and process, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Lease:
    """A held lease on one audience."""

    engine: Engine
    audience_id: int
    audience_name: str
    owner: str
    seconds: float = DEFAULT_LEASE_SECONDS
    _renewed_at: float = 0.0

    def acquire(self, wait: float = 0.0) -> int:
        """Take the lease, waiting up to ``wait`` seconds; return how many runs a crashed
        holder left ``running`` (now marked ``abandoned``)."""
        deadline = time.monotonic() + wait
        while True:
            now = utcnow()
            with self.engine.begin() as connection:
                taken = connection.execute(
                    update(A)
                    .where(
                        A.c.id == self.audience_id,
                        or_(
                            A.c.lease_owner.is_(None),
                            A.c.lease_expires_at < now,
                            A.c.lease_owner == self.owner,
                        ),
                    )
                    .values(
                        lease_owner=self.owner,
                        lease_acquired_at=now,
                        lease_expires_at=now + timedelta(seconds=self.seconds),
                    )
                ).rowcount
                if taken:
                    # Holding the lease, any run still `running` lost its process.
                    abandoned = connection.execute(
                        update(RUNS)
                        .where(RUNS.c.audience_id == self.audience_id, RUNS.c.status == "running")
                        .values(
                            status="abandoned",
                            finished_at=now,
                            error="its process stopped before finishing (lease expired)",
                        )
                    ).rowcount
                    self._renewed_at = time.monotonic()
                    return int(abandoned)
                holder = connection.execute(
                    select(A.c.lease_owner, A.c.lease_acquired_at).where(A.c.id == self.audience_id)
                ).one()
            if time.monotonic() >= deadline:
                since = holder.lease_acquired_at.isoformat(timespec="seconds")
                raise LeaseHeldError(
                    f'audience "{self.audience_name}" is being synced by {holder.lease_owner} '
                    f"since {since}; wait for it (--wait SECONDS) or try again later"
                )
            time.sleep(min(LEASE_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def renew(self, force: bool = False) -> None:
        """Extend the lease (at most every third of its life unless forced)."""
        if not force and time.monotonic() - self._renewed_at < self.seconds / 3:
            return
        now = utcnow()
        with self.engine.begin() as connection:
            renewed = connection.execute(
                update(A)
                .where(A.c.id == self.audience_id, A.c.lease_owner == self.owner)
                .values(lease_expires_at=now + timedelta(seconds=self.seconds))
            ).rowcount
        if not renewed:
            raise LeaseLostError(
                f'lost the lease on audience "{self.audience_name}" (it expired and another '
                "process took over); stopping this run"
            )
        self._renewed_at = time.monotonic()

    def release(self) -> None:
        """Give the lease up (only if still ours)."""
        with self.engine.begin() as connection:
            connection.execute(
                update(A)
                .where(A.c.id == self.audience_id, A.c.lease_owner == self.owner)
                .values(lease_owner=None, lease_acquired_at=None, lease_expires_at=None)
            )
