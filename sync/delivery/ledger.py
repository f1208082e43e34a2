"""The delivery ledger: every state DB read and write of delivery — pages of pending rows,
compare-and-set acknowledgements, rejections, in-doubt marks, progress rows, recovery after a
crash, the ledger's ``delivery_batches`` rows (one per outcome of a batch, read per message
through the view ``deliveries``) and their pruning — so that the worker loop and the sending
code hold no SQL."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from json.encoder import encode_basestring
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    String,
    Text,
    and_,
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

from sync.clock import StateClock, state_now
from sync.delivery.batches import BatchResult, Unit
from sync.redaction import redactor
from sync.state.db import idle_transaction_limit
from sync.state.leases import Lease
from sync.state.memberships import pending_condition
from sync.state.tables import DELIVERY_BATCHES, DELIVERY_PROGRESS, MEMBERSHIPS, DeliveryOutcome

logger = logging.getLogger("sync.delivery")

M = MEMBERSHIPS
P = DELIVERY_PROGRESS
L = DELIVERY_BATCHES

# The columns of a ``delivery_batches`` row, in the order ``Ledger._entries`` builds them.
LOG_COLUMNS = (
    "batch_id",
    "audience_id",
    "destination",
    "outcome",
    "reason",
    "http_status",
    "sent_at",
    "acknowledged_at",
    "member_count",
    "messages",
)
# Rows deleted per transaction when pruning, so that a large prune never holds SQLite's one
# write lock (or many row locks) long enough to stall a delivery.
PRUNE_CHUNK = 10_000
# UTF-8 bytes of a ledger row's ``messages`` after which the next unit starts another row.
LEDGER_ROW_BYTES = 1_000_000
_HTTP_STATUS = re.compile(r"\bHTTP ([1-5][0-9][0-9])\b")
TRACK = '{"type":"track"'  # how an encoded track message starts


def member_in(engine: Engine) -> Any:
    """``member_id IN (:b_members)`` with the list as one bound value (``members_value``): a
    JSON array on SQLite and PostgreSQL. Binding hundreds of separate parameters per statement
    costs more than the statement itself, and so does a PostgreSQL array, which the driver
    escapes element by element in Python (JSON is one C call)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        ids: Any = select(literal_column("value")).select_from(
            func.json_each(bindparam("b_members", type_=String))
        )
        return M.c.member_id.in_(ids)
    if dialect == "postgresql":
        members = cast(bindparam("b_members", type_=Text), JSON)
        elements = func.json_array_elements_text(members).table_valued("value")
        return M.c.member_id.in_(select(elements.c.value))
    return M.c.member_id.in_(bindparam("b_members", expanding=True))


def members_value(engine: Engine, members: list[str]) -> Any:
    """The bound value of ``member_in``'s list."""
    return json.dumps(members) if engine.dialect.name in ("sqlite", "postgresql") else members


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


def ledger_messages(units: list[Unit]) -> list[tuple[int, str]]:
    """The ``delivery_batches`` rows' part for ``units``: how many units (members) each row
    holds, and its ``messages`` array — per message ``[messageId, type, id kind, member id,
    version, value, traits]``, value and traits spliced in as the JSON texts they were sent
    (no decoding and encoding again: this runs once per message delivered).

    One row, unless its text would pass ``LEDGER_ROW_BYTES`` (UTF-8): then the next unit
    starts another, so that no row but a single huge unit's passes a state DB's packet limit
    (MariaDB's ``max_allowed_packet`` is 16 MB by default; a refused row would undo the
    acknowledgement on every run). A unit (a member's two messages in ``mode = "both"``) is
    never split."""
    rows: list[tuple[int, str]] = []
    parts: list[str] = []
    count = size = 0
    quote = encode_basestring
    for unit in units:
        member = f'"{unit.id_kind}",{quote(unit.member_id)},{unit.version},'
        sent = f"{unit.value or 'null'},{unit.traits or 'null'}]"
        messages = unit.messages
        if len(messages) == 1:  # the common case, one string (a third of this function's time)
            kind = "track" if messages[0].startswith(TRACK) else "identify"
            entries = [f'["{unit.ids[0]}","{kind}",{member}{sent}']
        else:
            entries = [
                f'["{mid}","{"track" if m.startswith(TRACK) else "identify"}",{member}{sent}'
                for mid, m in zip(unit.ids, messages, strict=True)
            ]
        bytes_ = sum(len(e) if e.isascii() else len(e.encode()) for e in entries)
        if parts and size + bytes_ > LEDGER_ROW_BYTES:
            rows.append((count, f"[{','.join(parts)}]"))
            parts, count, size = [], 0, 0
        parts += entries
        size += bytes_ + len(entries)
        count += 1
    if parts:
        rows.append((count, f"[{','.join(parts)}]"))
    return rows


def _by_version(units: list[Unit]) -> dict[tuple[str, int], list[Unit]]:
    """Units by (id kind, version): one compare-and-set statement per group."""
    groups: dict[tuple[str, int], list[Unit]] = {}
    for unit in units:
        groups.setdefault((unit.id_kind, unit.version), []).append(unit)
    return groups


def _by_why(result: BatchResult) -> dict[tuple[str | None, float], list[Unit]]:
    """The left units by (reason, retry delay): one per half of a split batch at most."""
    groups: dict[tuple[str | None, float], list[Unit]] = {}
    for unit in result.left:
        groups.setdefault(result.why(unit), []).append(unit)
    return groups


def _http_status(reason: str | None) -> int | None:
    """The HTTP status a destination's answer carried, as its reason names it."""
    found = _HTTP_STATUS.search(reason) if reason else None
    return int(found.group(1)) if found else None


def prune_deliveries(engine: Engine, keep_seconds: float) -> int:
    """Delete ``deliveries`` rows sent more than ``keep_seconds`` ago (by the state DB's clock),
    in chunks of ``PRUNE_CHUNK`` rows per transaction; return how many.

    Rows are appended in ``id`` order, so the first young row by ``id`` bounds what goes: a
    walk of the primary key, no index on ``sent_at``. An old row appended after a young one
    (a slow batch of another computation) waits for the next prune. The newest row is never
    deleted: SQLite hands out the ids of an emptied table again, which would put a run's rows
    before its ``runs.ledger_from``."""
    deleted = 0
    with engine.connect() as connection:
        cutoff = state_now(connection) - timedelta(seconds=keep_seconds)
        young = connection.execute(
            select(L.c.id).where(L.c.sent_at >= cutoff).order_by(L.c.id).limit(1)
        ).scalar()
        if young is None:  # every row is old: the newest stays, so that no id is reused
            young = connection.execute(select(func.max(L.c.id))).scalar() or 0
        start = connection.execute(select(func.min(L.c.id))).scalar()
        connection.rollback()
    if start is None:
        return 0
    while start < young:
        end = min(start + PRUNE_CHUNK, young)
        with engine.begin() as connection:
            deleted += connection.execute(
                delete(L).where(L.c.id >= start, L.c.id < end, L.c.sent_at < cutoff)
            ).rowcount
        start = end
    if deleted:
        logger.info("pruned %d delivery ledger row(s) sent before %s", deleted, cutoff)
    return deleted


def _groups(
    units: list[Unit], doubt: Callable[[Unit], bool] | None = None
) -> dict[tuple[str, int, bool], list[str]]:
    """Member ids by (id kind, version, in doubt afterwards): one indexed ``IN`` statement per
    group, usually one per batch."""
    groups: dict[tuple[str, int, bool], list[str]] = {}
    for unit in units:
        flag = doubt(unit) if doubt else False
        groups.setdefault((unit.id_kind, unit.version, flag), []).append(unit.member_id)
    return groups


class Ledger:
    """The state DB side of one audience's delivery to one destination. Its writes may come
    from several threads: each uses a connection of its own, fenced by the lease."""

    def __init__(
        self,
        engine: Engine,
        audience_id: int,
        destination: str,
        *,
        max_attempts: int,
        lease: Lease | None = None,
        log: bool = True,
    ) -> None:
        """``max_attempts``: rejections after which a row is ``failed``. With a ``lease``,
        every write transaction is fenced by it. ``log``: append the ledger's rows of each
        batch outcome (``[state] delivery_ledger``)."""
        self.engine = engine
        self.audience_id = audience_id
        self.destination = destination
        self.max_attempts = max_attempts
        self.lease = lease
        self.log = log
        self.clock: StateClock | None = None  # measured when delivery starts
        self._lock = threading.Lock()
        # SQLite has one writer at a time, and a waiting writer sleeps in its busy handler
        # (1, 2, 5, 10… ms): the workers queue on a mutex instead.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        self._queue_lock = threading.Lock()
        self._queue: list[list[Any]] = []  # outcomes waiting for the write mutex
        self._local = threading.local()
        self._connections: list[Connection] = []
        # The current page's hand-over time: [time, the driver's form of it]. A new list per
        # page; each batch's outcome carries its page's (``BatchResult.handed``).
        self.handed: list[Any] = [None, None]
        # A time as the driver takes it (SQLite: text), converted once per page or batch.
        self._time: Callable[[datetime], Any] = L.c.sent_at.type.bind_processor(engine.dialect) or (
            lambda moment: moment
        )
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._log_sql = (
            f"INSERT INTO {L.name} ({', '.join(LOG_COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(LOG_COLUMNS))})"
        )
        self._joint_sql = self._joint_statement()
        self._build_statements()

    def _joint_statement(self) -> str | None:
        """On PostgreSQL: a batch's acknowledgement (of its first (id kind, version) group)
        and its ledger row as one statement, one round trip (a data-modifying CTE; the
        ``UPDATE``'s row count is the statement's). Positional parameters: the ledger row's
        ``LOG_COLUMNS``, then ``delivered_at``, audience, destination, id kind, version and the
        members as a JSON array. ``None`` elsewhere (SQLite: no round trip to save; MariaDB:
        no data-modifying CTE)."""
        if self.engine.dialect.name != "postgresql":
            return None
        return (
            f"WITH logged AS (INSERT INTO {L.name} ({', '.join(LOG_COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(LOG_COLUMNS))})) "
            f"UPDATE {M.name} SET synced_value = value, in_doubt = false, status = 'in_sync', "
            "attempts = 0, last_error = NULL, next_attempt_at = NULL, delivered_at = %s "
            "WHERE audience_id = %s AND destination = %s AND id_kind = %s AND version = %s "
            "AND member_id IN (SELECT json_array_elements_text(%s::json))"
        )

    def _build_statements(self) -> None:
        """Statements built once, executed per batch with bound values."""
        self._where = and_(
            M.c.audience_id == self.audience_id,
            M.c.destination == self.destination,
            M.c.id_kind == bindparam("b_kind"),
            member_in(self.engine),
        )
        self._where_at = and_(self._where, M.c.version == bindparam("b_version"))
        self._ack = (
            update(M)
            .where(self._where_at)
            .values(
                synced_value=M.c.value,
                in_doubt=False,
                status="in_sync",
                attempts=0,
                last_error=None,
                next_attempt_at=None,
                delivered_at=bindparam("b_now", type_=M.c.delivered_at.type),
            )
        )
        self._progress_row = and_(
            P.c.audience_id == self.audience_id, P.c.destination == self.destination
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

    def _group_commit(self, write: Callable[[Connection], None]) -> None:
        """Run ``write`` in a write transaction and return once it is committed.

        On SQLite, where writers take turns on one mutex, the outcomes that queued while
        another worker held it are written in one transaction by the next holder (group
        commit): every batch's writes stay all-or-nothing (a crash loses a group, whose rows
        the progress row covers, as it would lose a batch), with one commit, one fence and one
        WAL append for the group. A failed group fails each of its workers."""
        if self._write_lock is None:
            with self._writing() as connection:
                write(connection)
            return
        item: list[Any] = [write, None]  # [what to write, the error that undid it]
        with self._queue_lock:
            self._queue.append(item)
        with self._write_lock:
            with self._queue_lock:
                group, self._queue = self._queue, []
            if group:
                try:
                    with self._writing(locked=True) as connection:
                        for queued in group:
                            queued[0](connection)
                except BaseException as error:
                    for queued in group:
                        queued[1] = error
        if item[1] is not None:
            raise item[1]

    @contextmanager
    def _writing(self, *, locked: bool = False) -> Iterator[Connection]:
        """A write transaction on the state DB, from any thread, on that thread's connection
        (a pool checkout per batch costs a ping on PostgreSQL)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.engine.connect()
            with self._lock:
                self._connections.append(connection)
            if self.lease is not None:
                # A transaction left idle longer than the lease is a frozen process's.
                idle_transaction_limit(connection, self.lease.seconds)
        mutex = None if locked else self._write_lock
        with mutex or contextlib.nullcontext(), connection.begin():
            yield connection
            if self.lease is not None:
                self.lease.fence(connection)

    def close(self) -> None:
        """Close the threads' connections (back to the pool with the server's idle limit
        again); only once no thread uses them any more."""
        for connection in self._connections:
            if self.lease is not None and not connection.invalidated:
                try:
                    connection.rollback()
                    idle_transaction_limit(connection, None)
                except Exception:  # ended by the server (a frozen run's): never pooled again
                    connection.invalidate()
            connection.close()

    def now(self) -> datetime:
        """The state DB's time (retry times and acknowledgements are compared across hosts)."""
        assert self.clock is not None
        return self.clock.now()

    def start(self) -> None:
        """Recover what an unfinished earlier delivery left, then record this one's start."""
        with self._writing() as connection:
            self.clock = StateClock(connection)
            recover_in_flight(connection, self.audience_id, self.destination)
            connection.execute(
                insert(P).values(
                    audience_id=self.audience_id,
                    destination=self.destination,
                    updated_at=self.now(),
                )
            )

    def pages(self, page: int) -> Iterator[list[Any]]:
        """Pending rows in (status pass, member) order, read in pages of ``page`` rows by
        keyset; rows waiting for a retry later than the state DB's time now are left for a
        later run.

        Each row is the driver's plain tuple ``(id_kind, member_id, anonymous_id, value,
        in_doubt, version, changed_at, traits)``: every column is already in the form
        ``MessageEncoder`` takes, so SQLAlchemy's row objects would only cost time."""
        now = self.now()
        # Rows rejected by earlier runs first: a row rejected during this run's `pending` pass must
        # not be retried by the same run.
        for status in ("rejected", "pending"):
            after: tuple[str, str] | None = None
            while True:
                query = self._page(status, now, page, after)
                with self.engine.connect() as connection:
                    rows = list(connection.execute(query).cursor.fetchall())
                if not rows:
                    break
                self.handed = [now, self._time(now)]
                yield rows
                after = (rows[-1][0], rows[-1][1])
                if len(rows) < page:
                    break

    def _page(self, status: str, now: datetime, page: int, after: tuple[str, str] | None) -> Any:
        """The next page of ``pages``: rows with ``status`` after the key ``after``."""
        # Values go into messages as stored: no enum checks, no JSON decoding and re-encoding, no
        # datetime parsing per row (MessageEncoder takes both forms).
        query = (
            select(
                type_coerce(M.c.id_kind, String).label("id_kind"),
                M.c.member_id,
                M.c.anonymous_id,
                M.c.value,
                M.c.in_doubt,
                M.c.version,
                type_coerce(M.c.changed_at, String).label("changed_at"),
                cast(M.c.traits, Text).label("traits"),
            )
            .where(
                pending_condition(self.audience_id, self.destination),
                M.c.status == status,
                or_(M.c.next_attempt_at.is_(None), M.c.next_attempt_at <= now),
            )
            .order_by(M.c.id_kind, M.c.member_id)
            .limit(page)
        )
        if after is not None:
            query = query.where(
                tuple_(M.c.id_kind, M.c.member_id) > tuple_(literal(after[0]), literal(after[1]))
            )
        return query

    def hand_over(self, kind: str, member: str) -> None:
        """Commit, before a page's batches are sent, that rows up to its last key may soon be
        at the destination (one small write per page; pages come in key order)."""
        now = self.now()
        self.handed[:] = [now, self._time(now)]
        with self._writing() as connection:
            connection.execute(
                self._advance,
                dict(b_kind=kind, b_member=member, b_new_kind=kind, b_new_member=member, b_now=now),
            )

    def done(self) -> None:
        """Every batch is recorded: nothing is in flight any more."""
        with self._writing() as connection:
            connection.execute(delete(P).where(self._progress_row))

    def _params(self, kind: str, members: list[str], version: int | None = None) -> Any:
        """Bound values of ``self._where``/``self._where_at``: these members' rows (at
        ``version``: compare-and-set)."""
        params = {"b_kind": kind, "b_members": members_value(self.engine, members)}
        return params if version is None else {**params, "b_version": version}

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

    def record(self, result: BatchResult) -> None:
        """One transaction per batch outcome; every update is a compare-and-set on version, so
        a change planned while the batch was in flight stays pending."""
        now = self.now()

        def doubt(unit: Unit) -> bool:
            # Still in doubt after a failed batch: it was before, or its attempt's fate is unknown.
            return unit.in_doubt or result.doubtful(unit)

        acked = _by_version(result.delivered)
        left = _by_why(result)  # by reason and retry delay: one group per half at most
        # The ledger's rows are built before the write transaction: on SQLite writers queue on
        # one mutex, and only the statements need to be inside it.
        entries = self._entries(result, left, now) if self.log else []

        # PostgreSQL: the acknowledgement's ledger row rides on the first group's statement.
        joint = bool(self._joint_sql and entries and acked and entries[0][3] == "acknowledged")
        logged = 1 if joint else 0

        def write(connection: Connection) -> None:
            for index, ((kind, version), units) in enumerate(acked.items()):
                members = [unit.member_id for unit in units]
                if joint and index == 0:
                    where = (now, self.audience_id, self.destination, kind, version)
                    matched = connection.exec_driver_sql(
                        self._joint_sql or "", (*entries[0], *where, json.dumps(members))
                    ).rowcount
                else:
                    matched = connection.execute(
                        self._ack, {**self._params(kind, members, version), "b_now": now}
                    ).rowcount
                if matched < len(members):
                    self._doubt_changed(connection, kind, version, members)
            for (reason, delay), units in left.items():
                retry_at = now + timedelta(seconds=delay)
                for (kind, version, in_doubt), members in _groups(units, doubt).items():
                    connection.execute(
                        update(M)
                        .where(self._where_at)
                        .values(last_error=reason, next_attempt_at=retry_at, in_doubt=in_doubt),
                        self._params(kind, members, version),
                    )
                    if in_doubt:
                        self._doubt_changed(connection, kind, version, members)
            doubtful = [u for u, _reason in result.rejected if doubt(u)]
            for (kind, version, _), members in _groups(doubtful).items():
                self._doubt_changed(connection, kind, version, members)
            if result.rejected:
                self._reject(connection, result.rejected, doubt)
            if len(entries) > logged:  # in the outcome's transaction: as the rows say
                connection.exec_driver_sql(self._log_sql, entries[logged:])

        self._group_commit(write)

    def _entries(
        self,
        result: BatchResult,
        left: dict[tuple[str | None, float], list[Unit]],
        now: datetime,
    ) -> list[tuple[Any, ...]]:
        """The batch's ``delivery_batches`` rows (``LOG_COLUMNS`` tuples): its acknowledged
        messages, its rejected ones by reason, its left ones by reason and by whether the
        destination may have applied them (``unknown``) or not (``refused``). Each message
        as read for sending it, even if its row has changed meanwhile."""
        batch = uuid.uuid4().hex
        # Not read from a page (cannot happen): sent when recorded.
        sent = (result.handed or [now, self._time(now)])[1]
        head = (batch, self.audience_id, self.destination)
        entries: list[tuple[Any, ...]] = []
        acked = self._time(now)
        for count, text in ledger_messages(result.delivered) if result.delivered else ():
            entries.append((*head, "acknowledged", None, None, sent, acked, count, text))
        rejected: dict[str, list[Unit]] = {}
        for unit, reason in result.rejected:
            said = redactor().redact(reason)
            if result.doubtful(unit):  # its last answer, but the destination may hold it
                said += "; an earlier attempt may have applied it (the row stays in doubt)"
            rejected.setdefault(said, []).append(unit)
        groups: list[tuple[DeliveryOutcome, str | None, list[Unit]]] = [
            ("rejected", said, units) for said, units in rejected.items()
        ]
        for (why, _delay), units in left.items():
            left_said = redactor().redact(why) if why else None
            groups.append(("unknown", left_said, [u for u in units if result.doubtful(u)]))
            groups.append(("refused", left_said, [u for u in units if not result.doubtful(u)]))
        for outcome, said_why, units in groups:
            status = _http_status(said_why)
            for count, text in ledger_messages(units) if units else ():
                entries.append((*head, outcome, said_why, status, sent, None, count, text))
        return entries

    def _reject(
        self,
        connection: Connection,
        rejected: list[tuple[Unit, str]],
        doubt: Callable[[Unit], bool],
    ) -> None:
        """Count an attempt on each rejected row (``failed`` after ``max_attempts``), with its
        reason. Rejections carry one reason each: few rows, one executemany."""
        connection.execute(
            update(M)
            .where(
                M.c.audience_id == self.audience_id,
                M.c.destination == self.destination,
                M.c.id_kind == bindparam("b_kind"),
                M.c.member_id == bindparam("b_member"),
                M.c.version == bindparam("b_version"),
            )
            .values(
                attempts=M.c.attempts + 1,
                status=case(
                    (M.c.attempts + 1 >= self.max_attempts, "failed"),
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
                for u, reason in rejected
            ],
        )
