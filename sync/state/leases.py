"""Row-level leases: one process at a time runs an audience; a crashed holder's lease expires.

A lease is taken and renewed with the state database's clock (hosts' clocks may differ), kept
alive by a heartbeat thread for as long as the run lives (a worker waiting out a long
``Retry-After`` or a slow source query does not let it lapse), and **fences** every write of
the run: each of its transactions checks, just before committing, that the lease is still the
one it took (``Lease.fence``), and every batch is sent only while the lease is known to be held
(``Lease.ensure_held``). A run that lost its lease stops without writing or sending again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from datetime import timedelta

from sqlalchemy import Connection, Engine, or_, select, update

from sync.clock import state_now
from sync.errors import LeaseHeldError, LeaseLostError
from sync.state.runs import abandon_runs
from sync.state.tables import AUDIENCES as A

logger = logging.getLogger("sync.leases")

# How often `--wait` polls for a held lease.
LEASE_POLL_SECONDS = 0.5
# The heartbeat renews the lease this many times per lease life, so that a renewal or two can
# fail (a state DB restart) before the lease lapses.
RENEWALS_PER_LEASE = 3
# A batch is not handed to a destination when the lease has less than this fraction of its
# life left by this host's monotonic clock: the send itself takes time.
SEND_MARGIN_FRACTION = 0.1


def new_owner_id() -> str:
    """A process id naming this host and process, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    """The lease of one audience, taken by one run (a fresh token per acquisition)."""

    def __init__(
        self,
        engine: Engine,
        audience_id: int,
        title: str,
        owner: str,
        seconds: float,
    ) -> None:
        self.engine = engine
        self.audience_id = audience_id
        # How messages name the computation: 'audience "VIP"', 'trait group "Plans"'.
        self.title = title
        self.seconds = seconds
        # The process id plus a token of this acquisition: a later run of the same process
        # holds a different lease, so this run's writes cannot pass its fence.
        self.token = f"{owner}:{secrets.token_hex(4)}"
        # Fault drills and tests set this to stall the heartbeat (a process frozen in GC, a
        # host cut off from the state DB) without stopping the run.
        self.heartbeat_paused = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._valid_until = 0.0  # by this host's monotonic clock
        self._heartbeat: threading.Thread | None = None
        self.taken_over_by: str | None = None

    # --- taking and giving up ------------------------------------------------------------

    def acquire(self, wait: float = 0.0) -> int:
        """Take the lease, waiting up to ``wait`` seconds, and start its heartbeat; return how
        many runs a crashed or stalled holder left ``running`` (now marked ``abandoned``)."""
        deadline = time.monotonic() + wait
        waiting = False
        while True:
            started = time.monotonic()
            with self.engine.begin() as connection:
                now = state_now(connection)
                taken = connection.execute(
                    update(A)
                    .where(
                        A.c.id == self.audience_id,
                        or_(A.c.lease_owner.is_(None), A.c.lease_expires_at < now),
                    )
                    .values(
                        lease_owner=self.token,
                        lease_acquired_at=now,
                        lease_expires_at=now + timedelta(seconds=self.seconds),
                    )
                ).rowcount
                if taken:
                    # Holding the lease, any run still `running` lost its process (or its
                    # lease): its own writes are fenced, so this mark stays.
                    abandoned = abandon_runs(connection, self.audience_id, now)
                else:
                    holder = connection.execute(
                        select(A.c.lease_owner, A.c.lease_acquired_at).where(
                            A.c.id == self.audience_id
                        )
                    ).one()
            if taken:
                self._valid_until = started + self.seconds
                self._start_heartbeat()
                return abandoned
            if holder.lease_owner is None:
                continue  # released between our attempt and our look (MariaDB): try again
            since = holder.lease_acquired_at.isoformat(timespec="seconds")
            busy = (
                f"{self.title} is being synced by {_process_of(holder.lease_owner)} since {since}"
            )
            if time.monotonic() >= deadline:
                raise LeaseHeldError(f"{busy}; wait for it (--wait SECONDS) or try again later")
            if not waiting:
                waiting = True
                logger.info("%s; waiting up to %.0fs for it", busy, wait)
            time.sleep(min(LEASE_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        """Stop the heartbeat and give the lease up (only if still ours)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        with self.engine.begin() as connection:
            connection.execute(
                update(A)
                .where(A.c.id == self.audience_id, A.c.lease_owner == self.token)
                .values(lease_owner=None, lease_acquired_at=None, lease_expires_at=None)
            )

    # --- keeping it ------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"lease-{self.audience_id}", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = self.seconds / RENEWALS_PER_LEASE
        while not self._stop.wait(interval) and not self._lost.is_set():
            if self.heartbeat_paused.is_set():
                continue
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as exc:  # the state DB may come back before the lease lapses
                logger.warning(
                    "%s: could not renew the lease (%s); retrying",
                    self.title,
                    " ".join(str(exc).split())[:200],
                )

    def renew(self) -> None:
        """Extend the lease by its full life from the state DB's now."""
        started = time.monotonic()
        with self.engine.begin() as connection:
            now = state_now(connection)
            renewed = connection.execute(
                update(A)
                .where(A.c.id == self.audience_id, A.c.lease_owner == self.token)
                .values(lease_expires_at=now + timedelta(seconds=self.seconds))
            ).rowcount
            if not renewed:
                self._mark_lost(connection)
        if not renewed:
            self.ensure_held()  # raises: lost
        self._valid_until = started + self.seconds

    def _mark_lost(self, connection: Connection) -> None:
        self.taken_over_by = connection.execute(
            select(A.c.lease_owner).where(A.c.id == self.audience_id)
        ).scalar()
        self._lost.set()

    # --- fencing -----------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """Whether this run is known to have lost its lease."""
        return self._lost.is_set()

    def ensure_held(self, margin: float = 0.0) -> None:
        """Raise ``LeaseLostError`` unless the lease is held for at least ``margin`` more
        seconds by this host's monotonic clock (the last renewal's start plus the lease's
        life: never later than the state DB's expiry). When the heartbeat fell behind (a
        long SQLite plan held the write lock), renew now: that succeeds only if nobody took
        the lease over meanwhile."""
        if not self._lost.is_set() and time.monotonic() + margin >= self._valid_until:
            self.renew()
        if self._lost.is_set():
            holder = self.taken_over_by
            by = f" by {_process_of(holder)}" if holder else ""
            raise LeaseLostError(
                f"lost the lease on {self.title} (it expired and was taken "
                f"over{by}); this run stopped without writing or sending more"
            )
        if time.monotonic() + margin >= self._valid_until:
            raise LeaseLostError(
                f"the lease on {self.title} expired (its heartbeat could not "
                "renew it in time); this run stopped without sending more"
            )

    def ensure_sendable(self) -> None:
        """``ensure_held`` with room for a send to finish inside the lease."""
        self.ensure_held(self.seconds * SEND_MARGIN_FRACTION)

    def fence(self, connection: Connection) -> None:
        """Inside a write transaction, just before it commits: raise ``LeaseLostError`` (the
        caller rolls back) unless the lease is still this run's, and keep any other process
        from taking it over until the transaction ends."""
        if connection.dialect.name == "sqlite":
            # The write lock this takes (or already holds) keeps every other writer out.
            held = connection.execute(
                update(A)
                .where(A.c.id == self.audience_id, A.c.lease_owner == self.token)
                .values(lease_owner=A.c.lease_owner)
            ).rowcount
        else:
            # A shared row lock: other fenced writes of this run go on in parallel, a takeover
            # (an UPDATE of the row) waits for them to commit, then they are fenced out.
            owner = connection.execute(
                select(A.c.lease_owner).where(A.c.id == self.audience_id).with_for_update(read=True)
            ).scalar()
            held = owner == self.token
        if not held:
            self._mark_lost(connection)
            self.ensure_held()


def _process_of(lease_owner: str | None) -> str:
    """The host:pid:start part of a lease owner (without the acquisition token)."""
    if not lease_owner:
        return "another process"
    return lease_owner.rsplit(":", 1)[0] if lease_owner.count(":") >= 3 else lease_owner
