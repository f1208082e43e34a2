"""Delivery: send pending memberships in member order, in batches, with bounded concurrency.

Each batch's outcome is recorded in one transaction, acknowledging with compare-and-set on
``version`` so that a change made while the batch was in flight stays pending.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from sync.clock import StateClock, state_now
from sync.destinations import Destination
from sync.errors import (
    PermanentDeliveryError,
    RejectedBatchError,
    TransientDeliveryError,
)
from sync.messages import AudienceContext, MessageEncoder
from sync.state.leases import Lease
from sync.state.memberships import pending_condition
from sync.state.tables import DELIVERY_PROGRESS, MEMBERSHIPS

logger = logging.getLogger("sync.delivery")

# Bytes of the batch envelope around the messages ({"batch":[...],"sentAt":"..."}), rounded up.
BATCH_ENVELOPE_BYTES = 128
# Rows read from the state DB per page (at least one batch per worker). Each page costs a
# query and a progress write; its encoded messages (a few MB) bound delivery's memory.
PAGE_ROWS = 10_000

M = MEMBERSHIPS
P = DELIVERY_PROGRESS


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried, from ``[defaults]`` in the config."""

    initial_delay: float = 1.0
    max_delay: float = 60.0
    time_budget: float = 600.0
    max_attempts: int = 5

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter; a destination's ``Retry-After`` wins if longer."""
        base = min(self.max_delay, self.initial_delay * (2**attempt))
        delay = random.uniform(base / 2, base)
        return max(delay, retry_after or 0.0)


@dataclass
class DeliveryStats:
    """What delivery did for one destination in one run."""

    sent: int = 0
    rejected: int = 0
    failed: int = 0
    # Messages sent without some of their traits, which put them over the size limit.
    trimmed: int = 0
    left_pending: int = 0
    error: str | None = None
    fatal: bool = False


class _Unit(NamedTuple):
    """One membership change and the message(s) that announce it (a tuple: built per row)."""

    id_kind: str
    member_id: str
    version: int
    in_doubt: bool
    messages: list[str]  # encoded JSON
    size: int


@dataclass
class _BatchResult:
    delivered: list[_Unit] = field(default_factory=list)
    rejected: list[tuple[_Unit, str]] = field(default_factory=list)
    left: list[_Unit] = field(default_factory=list)
    left_reason: str | None = None
    retry_delay: float = 0.0
    # Some attempt ended without knowing whether the destination applied the batch.
    uncertain: bool = False


def _size(message: str) -> int:
    """UTF-8 bytes of one encoded message in a batch body, with its separating comma."""
    return (len(message) if message.isascii() else len(message.encode("utf-8"))) + 1


def _groups(
    units: list[_Unit], doubt: Callable[[_Unit], bool] | None = None
) -> dict[tuple[str, int, bool], list[str]]:
    """Member ids by (id kind, version, in doubt afterwards): one indexed ``IN`` statement per
    group, usually one per batch."""
    groups: dict[tuple[str, int, bool], list[str]] = {}
    for unit in units:
        flag = doubt(unit) if doubt else False
        groups.setdefault((unit.id_kind, unit.version, flag), []).append(unit.member_id)
    return groups


def member_in(engine: Engine) -> Any:
    """``member_id IN (:b_members)`` with the list as one bound value (``members_value``): a
    JSON array on SQLite, an array on PostgreSQL. Binding hundreds of separate parameters per
    statement costs more than the statement itself."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        ids: Any = select(literal_column("value")).select_from(
            func.json_each(bindparam("b_members", type_=String))
        )
        return M.c.member_id.in_(ids)
    if dialect == "postgresql":
        return M.c.member_id == any_(bindparam("b_members", type_=ARRAY(String)))
    return M.c.member_id.in_(bindparam("b_members", expanding=True))


def members_value(engine: Engine, members: list[str]) -> Any:
    """The bound value of ``member_in``'s list."""
    return json.dumps(members) if engine.dialect.name == "sqlite" else members


def recover_in_flight(
    connection: Connection, audience_id: int, destination: str | None = None
) -> int:
    """After a delivery that did not end (a crash, a kill), mark the rows it may have handed
    over without an acknowledgement ``in_doubt``; return how many. Runs before planning, since
    whether a leaver still needs its ``false`` depends on it.

    Every unacknowledged row up to the recorded key is marked, sent or not: marking a row that
    was never sent costs at most one extra message, missing one would leave a stale ``true``.
    """
    of = P.c.audience_id == audience_id
    if destination is not None:
        of = and_(of, P.c.destination == destination)
    marked = 0
    progress = connection.execute(
        select(P.c.destination, P.c.through_kind, P.c.through_member).where(of)
    ).all()
    for name, kind, member in progress:
        if member is not None:
            marked += connection.execute(
                update(M)
                .where(
                    M.c.audience_id == audience_id,
                    M.c.destination == name,
                    M.c.status.in_(("pending", "rejected")),
                    M.c.in_doubt == False,  # noqa: E712
                    tuple_(M.c.id_kind, M.c.member_id) <= tuple_(literal(kind), literal(member)),
                )
                .values(in_doubt=True)
            ).rowcount
            logger.warning(
                'an earlier delivery to "%s" did not finish; its unacknowledged rows are marked '
                "in doubt and stay pending",
                name,
            )
    if progress:
        connection.execute(delete(P).where(of))
    return marked


def retry_due(connection: Connection, audience_id: int) -> bool:
    """Whether transient leftovers of this audience have waited out their backoff."""
    query = select(M.c.member_id).where(
        M.c.audience_id == audience_id,
        M.c.status == "pending",
        M.c.next_attempt_at.is_not(None),
        M.c.next_attempt_at <= state_now(connection),
    )
    return connection.execute(query.limit(1)).first() is not None


def _pages(
    engine: Engine, audience_id: int, destination: str, page: int, now: datetime
) -> Iterator[list[Any]]:
    """Pending rows in (status pass, member) order, read in pages by keyset; rows waiting
    for a retry later than ``now`` (the state DB's time) are left for a later run."""
    # Rows rejected by earlier runs first: a row rejected during this run's `pending` pass must
    # not be retried by the same run.
    for status in ("rejected", "pending"):
        last: tuple[str, str] | None = None
        while True:
            # Values go into messages as stored: no enum checks, no JSON decoding and
            # re-encoding, no datetime parsing per row (MessageEncoder takes both forms).
            query = (
                select(
                    type_coerce(M.c.id_kind, String).label("id_kind"),
                    M.c.member_id,
                    M.c.anonymous_id,
                    M.c.desired,
                    M.c.in_doubt,
                    M.c.version,
                    type_coerce(M.c.changed_at, String).label("changed_at"),
                    cast(M.c.traits, Text).label("traits"),
                )
                .where(
                    pending_condition(audience_id, destination),
                    M.c.status == status,
                    or_(M.c.next_attempt_at.is_(None), M.c.next_attempt_at <= now),
                )
                .order_by(M.c.id_kind, M.c.member_id)
                .limit(page)
            )
            if last is not None:
                query = query.where(
                    tuple_(M.c.id_kind, M.c.member_id) > tuple_(literal(last[0]), literal(last[1]))
                )
            with engine.connect() as connection:
                # The driver's plain tuples: every column is already in the form the encoder
                # takes, so SQLAlchemy's row objects would only cost time.
                rows = list(connection.execute(query).cursor.fetchall())
            if not rows:
                break
            yield rows
            last = (rows[-1][0], rows[-1][1])
            if len(rows) < page:
                break


class Deliverer:
    """Delivers one audience's pending rows to one destination."""

    def __init__(
        self,
        engine: Engine,
        audience_id: int,
        context: AudienceContext,
        destination: Destination,
        policy: RetryPolicy,
        *,
        deadline: float,
        stop: threading.Event | None = None,
        lease: Lease | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """With a ``lease``, every write is fenced by it and no batch is sent without it."""
        self.engine = engine
        self.audience_id = audience_id
        self.context = context
        self.destination = destination
        self.policy = policy
        self.deadline = deadline
        self.stop = stop or threading.Event()
        self.lease = lease
        self.clock: StateClock | None = None  # measured when delivery starts
        self.progress = progress or (lambda n: None)
        self.max_message_bytes = destination.max_message_bytes
        self.encoder = MessageEncoder(context)
        self.stats = DeliveryStats()
        self._abort = threading.Event()
        self._lock = threading.Lock()  # stats and progress, updated by worker threads
        # SQLite has one writer at a time, and a waiting writer sleeps in its busy handler
        # (1, 2, 5, 10… ms): the workers queue on a mutex instead.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        self._local = threading.local()
        # Statements built once, executed per batch with bound values.
        self._where = and_(
            M.c.audience_id == audience_id,
            M.c.destination == context.destination,
            M.c.id_kind == bindparam("b_kind"),
            member_in(engine),
        )
        self._where_at = and_(self._where, M.c.version == bindparam("b_version"))
        self._ack = (
            update(M)
            .where(self._where_at)
            .values(
                synced=M.c.desired,
                in_doubt=False,
                status="in_sync",
                attempts=0,
                last_error=None,
                next_attempt_at=None,
                delivered_at=bindparam("b_now", type_=M.c.delivered_at.type),
            )
        )
        self._progress_row = and_(
            P.c.audience_id == audience_id, P.c.destination == context.destination
        )
        self._advance = (
            update(P)
            .where(
                self._progress_row,
                or_(
                    P.c.through_member.is_(None),
                    tuple_(P.c.through_kind, P.c.through_member)
                    < tuple_(bindparam("b_kind"), bindparam("b_member")),
                ),
            )
            .values(
                through_kind=bindparam("b_new_kind", type_=String),
                through_member=bindparam("b_new_member", type_=String),
                updated_at=bindparam("b_now", type_=P.c.updated_at.type),
            )
        )
        self._connections: list[Connection] = []

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction on the state DB, from any thread, on that thread's connection
        (a pool checkout per batch costs a ping on PostgreSQL)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.engine.connect()
            with self._lock:
                self._connections.append(connection)
        with self._write_lock or contextlib.nullcontext(), connection.begin():
            yield connection
            if self.lease is not None:
                self.lease.fence(connection)

    # --- main thread ---------------------------------------------------------------------

    def run(self) -> DeliveryStats:
        """Deliver until nothing is pending, the budget is spent, a stop is asked, or a fatal
        error (bad credentials, unwritable file) ends this destination's delivery."""
        concurrency = max(1, self.destination.concurrency)
        page = max(PAGE_ROWS, self.destination.max_batch_messages * concurrency)
        in_flight: set[Future[None]] = set()
        try:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="deliver") as pool:
                try:
                    self._start()
                    for rows in _pages(
                        self.engine, self.audience_id, self.context.destination, page, self._now()
                    ):
                        if self._should_stop():
                            break
                        self._hand_over(rows[-1][0], rows[-1][1])
                        for batch in self._batches(rows):
                            while len(in_flight) >= concurrency:
                                self._collect(in_flight)
                            if self._should_stop():
                                break
                            # The copied context carries the run id into the worker's logs.
                            context = contextvars.copy_context()
                            in_flight.add(pool.submit(context.run, self._deliver_batch, batch))
                        if self.lease is not None:
                            self.lease.ensure_held()
                        if self._should_stop():
                            break
                    while in_flight:
                        self._collect(in_flight)
                    # Not on an exception: a batch's fate may be unknown, the next run recovers.
                    self._done()
                finally:
                    self._abort.set()
                    while in_flight:
                        self._collect(in_flight)
        finally:
            # After the pool has joined its workers: no connection is still in use.
            for connection in self._connections:
                connection.close()
        return self.stats

    def _should_stop(self) -> bool:
        return self.stop.is_set() or self._abort.is_set() or time.monotonic() >= self.deadline

    def _batches(self, rows: list[Any]) -> Iterator[list[_Unit]]:
        limit_messages = self.destination.max_batch_messages
        limit_bytes = self.destination.max_batch_bytes
        batch: list[_Unit] = []
        batch_messages = 0
        batch_bytes = BATCH_ENVELOPE_BYTES
        oversized: list[tuple[_Unit, str]] = []
        encode = self.encoder.messages
        for kind, member, anonymous, desired, in_doubt, version, changed_at, traits in rows:
            messages = encode(kind, member, anonymous, bool(desired), version, changed_at, traits)
            # Bytes in the body (UTF-8) plus the separating comma; one message in the common
            # (identify) case, so no list is built for it.
            if len(messages) == 1:
                size = largest = _size(messages[0])
            else:
                sizes = [_size(m) for m in messages]
                size, largest = sum(sizes), max(sizes)
            if self.max_message_bytes is not None and largest > self.max_message_bytes:
                # The value change must go through: without the traits that make it too big.
                messages, dropped = self.encoder.fitting(
                    kind, member, anonymous, bool(desired), version, changed_at, traits, self._fits
                )
                sizes = [_size(m) for m in messages]
                size = sum(sizes)
                if not self._fits(messages):
                    unit = _Unit(kind, member, version, bool(in_doubt), messages, size)
                    oversized.append((unit, self._too_big(max(sizes))))
                    continue
                self._trimmed(member, largest, dropped)
            unit = _Unit(kind, member, version, bool(in_doubt), messages, size)
            too_many = batch_messages + len(messages) > limit_messages
            too_big = limit_bytes is not None and batch_bytes + unit.size > limit_bytes
            if batch and (too_many or too_big):
                yield batch
                batch, batch_messages, batch_bytes = [], 0, BATCH_ENVELOPE_BYTES
            batch.append(unit)
            batch_messages += len(messages)
            batch_bytes += unit.size
        if oversized:
            self._record(_BatchResult(rejected=oversized))
        if batch:
            yield batch

    def _fits(self, messages: list[str]) -> bool:
        """Whether every message is within the destination's per-message limit."""
        limit = self.max_message_bytes
        return limit is None or all(_size(m) <= limit for m in messages)

    def _too_big(self, size: int) -> str:
        return (
            f"message is {size} bytes even without its traits, over the destination's limit "
            f"of {self.max_message_bytes} bytes"
        )

    def _trimmed(self, member: str, size: int, dropped: list[str]) -> None:
        """Count and name a message sent without the traits that made it too big."""
        logger.warning(
            'destination "%s": member %s: message of %d bytes is over the limit of %d bytes; '
            "sent without trait(s) %s",
            self.context.destination,
            member,
            size,
            self.max_message_bytes,
            ", ".join(dropped),
        )
        with self._lock:
            self.stats.trimmed += 1

    @staticmethod
    def _collect(in_flight: set[Future[None]]) -> None:
        """Wait for a batch to finish; a database error in a worker surfaces here."""
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            in_flight.discard(future)
            future.result()

    @staticmethod
    def _doubt(unit: _Unit, result: _BatchResult) -> bool:
        """Still in doubt after a failed batch: it was before, or this batch's fate is unknown."""
        return unit.in_doubt or result.uncertain

    def _params(self, kind: str, members: list[str], version: int | None = None) -> Any:
        """Bound values of ``self._where``/``self._where_at``: these members' rows (at
        ``version``: compare-and-set)."""
        params = {"b_kind": kind, "b_members": members_value(self.engine, members)}
        return params if version is None else {**params, "b_version": version}

    def _now(self) -> datetime:
        """The state DB's time (retry times and acknowledgements are compared across hosts)."""
        assert self.clock is not None
        return self.clock.now()

    def _start(self) -> None:
        """Recover what an unfinished earlier delivery left, then record this one's start."""
        with self._writing() as connection:
            self.clock = StateClock(connection)
            recover_in_flight(connection, self.audience_id, self.context.destination)
            connection.execute(
                insert(P).values(
                    audience_id=self.audience_id,
                    destination=self.context.destination,
                    updated_at=self._now(),
                )
            )

    def _hand_over(self, kind: str, member: str) -> None:
        """Commit, before a page's batches are sent, that rows up to its last key may soon be
        at the destination (one small write per page; pages come in key order)."""
        now = self._now()
        with self._writing() as connection:
            connection.execute(
                self._advance,
                {
                    "b_kind": kind,
                    "b_member": member,
                    "b_new_kind": kind,
                    "b_new_member": member,
                    "b_now": now,
                },
            )

    def _done(self) -> None:
        """Every batch is recorded: nothing is in flight any more."""
        with self._writing() as connection:
            connection.execute(delete(P).where(self._progress_row))

    def _doubt_changed(
        self, connection: Connection, kind: str, version: int, members: list[str]
    ) -> None:
        """Rows changed while their batch was in flight (the compare-and-set missed them): the
        destination may hold what was sent, which is no longer ``desired``, so they stay
        pending and in doubt."""
        connection.execute(
            update(M).where(self._where, M.c.version != version).values(in_doubt=True),
            self._params(kind, members),
        )

    def _record(self, result: _BatchResult) -> None:
        """One transaction per batch outcome; every update is a compare-and-set on version, so
        a change planned while the batch was in flight stays pending."""
        now = self._now()

        def doubt(unit: _Unit) -> bool:
            return self._doubt(unit, result)

        with self._writing() as connection:
            for (kind, version, _), members in _groups(result.delivered).items():
                acked = connection.execute(
                    self._ack, {**self._params(kind, members, version), "b_now": now}
                ).rowcount
                if acked < len(members):
                    self._doubt_changed(connection, kind, version, members)
            retry_at = now + timedelta(seconds=result.retry_delay)
            for (kind, version, in_doubt), members in _groups(result.left, doubt).items():
                connection.execute(
                    update(M)
                    .where(self._where_at)
                    .values(
                        last_error=result.left_reason, next_attempt_at=retry_at, in_doubt=in_doubt
                    ),
                    self._params(kind, members, version),
                )
                if in_doubt:
                    self._doubt_changed(connection, kind, version, members)
            doubtful = [u for u, _reason in result.rejected if doubt(u)]
            for (kind, version, _), members in _groups(doubtful).items():
                self._doubt_changed(connection, kind, version, members)
            # Rejections carry one reason each: few rows, one executemany.
            if result.rejected:
                connection.execute(
                    update(M)
                    .where(
                        M.c.audience_id == self.audience_id,
                        M.c.destination == self.context.destination,
                        M.c.id_kind == bindparam("b_kind"),
                        M.c.member_id == bindparam("b_member"),
                        M.c.version == bindparam("b_version"),
                    )
                    .values(
                        attempts=M.c.attempts + 1,
                        status=case(
                            (M.c.attempts + 1 >= self.policy.max_attempts, "failed"),
                            else_="rejected",
                        ),
                        last_error=bindparam("b_error"),
                        next_attempt_at=None,
                        in_doubt=bindparam("b_doubt"),
                    ),
                    [
                        {
                            "b_kind": u.id_kind,
                            "b_member": u.member_id,
                            "b_version": u.version,
                            "b_error": reason,
                            "b_doubt": doubt(u),
                        }
                        for u, reason in result.rejected
                    ],
                )
        with self._lock:
            self.stats.sent += len(result.delivered)
            self.stats.left_pending += len(result.left)
            self.stats.rejected += len(result.rejected)
            if result.left_reason and not self.stats.error:
                self.stats.error = result.left_reason
            if result.delivered:
                self.progress(len(result.delivered))

    # --- worker threads -------------------------------------------------------------------

    def _deliver_batch(self, units: list[_Unit]) -> None:
        """Send and record one batch. Workers do their own state DB writes, so that
        they overlap the main thread's reading and encoding (drivers release the GIL)."""
        if self._abort.is_set():
            return
        try:
            result = self._send_with_retries(units)
        except PermanentDeliveryError as exc:
            self._abort.set()
            logger.error("%s", exc)
            with self._lock:
                self.stats.fatal = True
                self.stats.error = str(exc)
            result = _BatchResult(left=units, left_reason=str(exc), uncertain=exc.outcome_unknown)
        self._record(result)

    def _send_with_retries(self, units: list[_Unit]) -> _BatchResult:
        attempt = 0
        uncertain = False
        while True:
            try:
                result = self._send_splitting(units)
                result.uncertain = result.uncertain or uncertain
                return result
            except TransientDeliveryError as exc:
                uncertain = uncertain or exc.outcome_unknown
                delay = self.policy.backoff(attempt, exc.retry_after)
                attempt += 1
                left = _BatchResult(
                    left=units, left_reason=str(exc), retry_delay=delay, uncertain=uncertain
                )
                out_of_time = time.monotonic() + delay > self.deadline
                if out_of_time or self.stop.is_set() or self._abort.is_set():
                    return left
                logger.warning("%s; retry %d in %.1fs", exc, attempt, delay)
                if self.stop.wait(delay) or self._abort.is_set():
                    return left

    def _send_splitting(self, units: list[_Unit]) -> _BatchResult:
        """Send; on a rejected batch, split it in halves until the bad messages are alone."""
        if self.lease is not None:
            self.lease.ensure_sendable()  # after a long wait too: a run without it sends nothing
        try:
            self.destination.send([m for u in units for m in u.messages])
        except RejectedBatchError as exc:
            if len(units) == 1:
                logger.warning(
                    'destination "%s" rejected member %s: %s',
                    self.context.destination,
                    units[0].member_id,
                    exc,
                )
                return _BatchResult(rejected=[(units[0], str(exc))])
            middle = len(units) // 2
            first = self._send_with_retries(units[:middle])
            second = self._send_with_retries(units[middle:])
            return _BatchResult(
                delivered=first.delivered + second.delivered,
                rejected=first.rejected + second.rejected,
                left=first.left + second.left,
                left_reason=first.left_reason or second.left_reason,
                retry_delay=max(first.retry_delay, second.retry_delay),
                uncertain=first.uncertain or second.uncertain,
            )
        return _BatchResult(delivered=list(units))
