"""The delivery ledger: every state DB read and write of delivery — pages of pending rows,
compare-and-set acknowledgements, rejections, in-doubt marks, progress rows, recovery after a
crash, the ``deliveries`` rows (one per message sent) and their pruning — so that the worker
loop and the sending code hold no SQL."""

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
from sync.state.tables import DELIVERIES, DELIVERY_PROGRESS, MEMBERSHIPS, DeliveryOutcome

logger = logging.getLogger("sync.delivery")

M = MEMBERSHIPS
P = DELIVERY_PROGRESS
L = DELIVERIES

# The columns of a ``deliveries`` row, in the order ``Ledger._log`` builds its tuples.
LOG_COLUMNS = (
    "message_id",
    "message_type",
    "batch_id",
    "audience_id",
    "destination",
    "id_kind",
    "member_id",
    "value",
    "traits",
    "version",
    "outcome",
    "reason",
    "http_status",
    "sent_at",
    "acknowledged_at",
)
# Rows deleted per transaction when pruning, so that a large prune never holds SQLite's one
# write lock (or many row locks) long enough to stall a delivery.
PRUNE_CHUNK = 10_000
_HTTP_STATUS = re.compile(r"\bHTTP ([1-5][0-9][0-9])\b")
_ID_MARK = '"messageId":"as-'


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


def _message_id(message: str, version: int) -> str:
    """The ``messageId`` of an encoded message, found in its text (decoding every message sent
    would cost more than its encoding did). Ours are ``as-<40 hex>-v<version>``, which a trait
    that happens to be called messageId does not fake."""
    tail = f'-v{version}"'
    start = message.find(_ID_MARK)
    while start >= 0:
        start += len(_ID_MARK) - 3
        if message.startswith(tail, start + 43):
            return message[start : start + 42 + len(tail)]
        start = message.find(_ID_MARK, start)
    return str(json.loads(message).get("messageId", ""))


def _message_type(message: str) -> str:
    """``identify`` or ``track``: an encoded message starts with its type."""
    return "track" if message.startswith('{"type":"track"') else "identify"


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
        every write transaction is fenced by it. ``log``: append a ``deliveries`` row per
        message sent (``[state] delivery_ledger``)."""
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
        self._build_statements()

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
        self._log_acked = self._acked_insert()
        self._ack_and_log = self._acked_statement()
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

    def _acked_insert(self) -> str | None:
        """The ``deliveries`` rows of one acknowledged group (id kind, version, message type,
        hand-over time) as one ``INSERT … SELECT`` (positional parameters: ``_acked_params``):
        value and traits come from the memberships rows the compare-and-set has just matched at
        the version sent, which is what was read for sending (only this runner writes them, and
        traits change only when a plan runs); the messageIds are bound as one value, a JSON
        object member → messageId (one C call to encode, where a PostgreSQL array is escaped
        element by element in Python).

        Binding 15 values per message cost more than the acknowledgement itself, and on SQLite
        it ran under the one write lock, taking the GIL back once per row. Driver SQL: SQLite
        must read the ids first (``CROSS JOIN`` fixes its join order), which SQLAlchemy cannot
        say. ``None`` on MariaDB/MySQL, whose driver already sends an executemany as one
        multi-row INSERT."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            mark, traits = "?", "m.traits"
            ids = "json_each(?) AS j CROSS JOIN"
            member, message = "j.key", "j.value"
        elif dialect == "postgresql":
            mark, traits = "%s", "CAST(m.traits AS TEXT)"
            ids = "json_each_text(%s::json) AS j (member, message) JOIN"
            member, message = "j.member", "j.message"
        else:
            return None
        columns = ", ".join(c for c in LOG_COLUMNS if c not in ("reason", "http_status"))
        return (
            f"INSERT INTO {L.name} ({columns}) "
            f"SELECT {message}, {mark}, {mark}, m.audience_id, m.destination, m.id_kind, "
            f"m.member_id, m.value, {traits}, m.version, 'acknowledged', {mark}, {mark} "
            f"FROM {ids} {M.name} AS m ON m.audience_id = {mark} AND m.destination = {mark} "
            f"AND m.id_kind = {mark} AND m.member_id = {member} AND m.version = {mark}"
        )

    def _acked_statement(self) -> str | None:
        """On PostgreSQL, with the ledger on: an acknowledged group's compare-and-set and its
        ``deliveries`` rows as one statement (positional parameters: ``_ack_and_log_params``).
        The ``UPDATE … RETURNING`` hands the rows it matched, at the version sent, to the
        ``INSERT``: no second lookup of each row (that join was ~45% of the ``INSERT … SELECT``
        on PostgreSQL), one round trip per group. Messages are bound as one JSON array of
        ``{"m": member, "t": message type, "i": messageId}`` (a member in ``mode = "both"`` has
        two). The result: the rows appended, and the members the compare-and-set missed (a JSON
        array, or NULL). ``None`` elsewhere: SQLite has no data-modifying CTE, MariaDB no
        ``RETURNING`` on ``UPDATE``."""
        if self.engine.dialect.name != "postgresql":
            return None
        columns = ", ".join(c for c in LOG_COLUMNS if c not in ("reason", "http_status"))
        return (
            "WITH ids AS MATERIALIZED (SELECT j.m, j.t, j.i "
            "FROM json_to_recordset(%s::json) AS j (m text, t text, i text)), "
            f"acked AS (UPDATE {M.name} SET synced_value = value, in_doubt = false, "
            "status = 'in_sync', attempts = 0, last_error = NULL, next_attempt_at = NULL, "
            "delivered_at = %s WHERE audience_id = %s AND destination = %s AND id_kind = %s "
            "AND version = %s AND member_id IN (SELECT m FROM ids) "
            "RETURNING member_id, value, traits), "
            f"logged AS (INSERT INTO {L.name} ({columns}) "
            "SELECT ids.i, ids.t, %s, %s, %s, %s, acked.member_id, acked.value, "
            "CAST(acked.traits AS TEXT), %s, 'acknowledged', %s, %s "
            "FROM acked JOIN ids ON ids.m = acked.member_id RETURNING 1) "
            "SELECT (SELECT count(*) FROM logged), (SELECT json_agg(DISTINCT ids.m) FROM ids "
            "WHERE ids.m NOT IN (SELECT member_id FROM acked))"
        )

    def _ack_and_log_params(
        self,
        group: tuple[str, int],
        units: list[Unit],
        handed: list[Any],
        batch: str,
        now: datetime,
    ) -> tuple[Any, ...]:
        """The parameters of ``_ack_and_log`` for one acknowledged group."""
        kind, version = group
        messages = [
            {"m": unit.member_id, "t": _message_type(message), "i": _message_id(message, version)}
            for unit in units
            for message in unit.messages
        ]
        where = (self.audience_id, self.destination, kind, version)
        head = (batch, self.audience_id, self.destination, kind, version, handed[1], now)
        return (json.dumps(messages), now, *where, *head)

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

        # The ledger's rows and parameters are built before the write transaction: on SQLite
        # writers queue on one mutex, and only the statements need to be inside it.
        batch = uuid.uuid4().hex
        acked = _by_version(result.delivered)
        # What each unit carries was read for sending it: the ledger records that, even if its
        # row has changed meanwhile. Not read from a page (cannot happen): sent when recorded.
        handed = result.handed or [now, self._time(now)]
        log: list[tuple[Any, ...]] = []
        together = self.log and self._ack_and_log is not None  # PostgreSQL: one statement
        by_sql = self.log and (together or self._log_acked is not None)  # else row by row
        left = _by_why(result)  # by reason and retry delay: one group per half at most
        if self.log:
            log = self._log_rows(result, left, handed, batch, now, delivered=not by_sql)
        sql_logs = {
            group: self._acked_params(group, units, handed, batch, now)
            for group, units in (acked.items() if by_sql and not together else ())
        }
        joint = {
            group: self._ack_and_log_params(group, units, handed, batch, now)
            for group, units in (acked.items() if together else ())
        }

        def write(connection: Connection) -> None:
            for (kind, version), units in acked.items():
                members = [unit.member_id for unit in units]
                if together:
                    missed = self._ack_and_log_group(connection, joint[(kind, version)], units)
                    if missed:  # the rows changed meanwhile: log what was read (not what is now)
                        at = self._time(now)
                        log.extend(self._rows_of(missed, "acknowledged", None, at, handed, batch))
                    continue
                matched = connection.execute(
                    self._ack, {**self._params(kind, members, version), "b_now": now}
                ).rowcount
                if matched < len(members):
                    self._doubt_changed(connection, kind, version, members)
                params = sql_logs.get((kind, version))
                if params and matched == len(members):
                    self._log_group(connection, params)
                elif by_sql:  # the rows changed meanwhile: log what was read (not what is now)
                    at = self._time(now)
                    log.extend(self._rows_of(units, "acknowledged", None, at, handed, batch))
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
            if log:  # in the outcome's transaction: the ledger never disagrees with the rows
                connection.exec_driver_sql(self._log_sql, log)

        self._group_commit(write)

    def _acked_params(
        self,
        group: tuple[str, int],
        units: list[Unit],
        handed: list[Any],
        batch: str,
        now: datetime,
    ) -> list[tuple[tuple[Any, ...], int]] | None:
        """The parameters of ``_log_acked``, and the rows each must append, for one acknowledged
        group: one statement per message type, usually one. ``None`` when a member repeats
        (it would be one key twice): such a group is logged row by row."""
        kind, version = group
        by_type: dict[str, dict[str, str]] = {}
        counts: dict[str, int] = {}
        for unit in units:
            for message in unit.messages:
                message_type = _message_type(message)
                ids = by_type.get(message_type)
                if ids is None:
                    ids = by_type[message_type] = {}
                ids[unit.member_id] = _message_id(message, version)
                counts[message_type] = counts.get(message_type, 0) + 1
        statements: list[tuple[tuple[Any, ...], int]] = []
        where = (self.audience_id, self.destination, kind, version)
        for message_type, ids in by_type.items():
            if len(ids) < counts[message_type]:
                return None
            head = (message_type, batch, handed[1], self._time(now))
            statements.append(((*head, json.dumps(ids), *where), len(ids)))
        return statements

    def _ack_and_log_group(
        self, connection: Connection, params: tuple[Any, ...], units: list[Unit]
    ) -> list[Unit]:
        """Acknowledge one group and append its ``deliveries`` rows in one statement
        (``_ack_and_log``); return the units the compare-and-set missed (changed while in
        flight: marked in doubt here, their ledger rows still to append). A row count that
        disagrees with the messages of the rows matched is a defect, as in ``_log_group``."""
        logged, missed_ids = connection.exec_driver_sql(self._ack_and_log or "", params).one()
        missed = set(missed_ids or ())
        expected = sum(len(unit.messages) for unit in units if unit.member_id not in missed)
        if logged != expected:
            raise RuntimeError(
                f'delivery ledger of "{self.destination}": {logged} row(s) for '
                f"{expected} acknowledged message(s)"
            )
        if not missed:
            return []
        self._doubt_changed(connection, units[0].id_kind, units[0].version, sorted(missed))
        return [unit for unit in units if unit.member_id in missed]

    def _log_group(
        self, connection: Connection, statements: list[tuple[tuple[Any, ...], int]]
    ) -> None:
        """Append an acknowledged group's rows, all of them or none: the compare-and-set has
        just matched every member at the version sent, so a shortfall is a defect (the
        transaction, acknowledgement included, is rolled back; the rows stay covered by the
        delivery's progress row and are recovered in doubt)."""
        assert self._log_acked is not None
        for parameters, expected in statements:
            inserted = connection.exec_driver_sql(self._log_acked, parameters).rowcount
            if inserted != expected:
                raise RuntimeError(
                    f'delivery ledger of "{self.destination}": {inserted} row(s) for '
                    f"{expected} acknowledged message(s)"
                )

    def _log_rows(
        self,
        result: BatchResult,
        left: dict[tuple[str | None, float], list[Unit]],
        handed: list[Any],
        batch: str,
        now: datetime,
        *,
        delivered: bool,
    ) -> list[tuple[Any, ...]]:
        """The ``deliveries`` rows of the batch's rejected and ``left`` messages (and, with
        ``delivered``, its acknowledged ones) as plain tuples for one executemany (no per-row
        statement building or type processing; times converted once)."""
        recorded = self._time(now)
        rows: list[tuple[Any, ...]] = []
        if delivered:
            rows += self._rows_of(
                result.delivered, "acknowledged", None, recorded, handed, batch
            )
        for unit, reason in result.rejected:
            said = redactor().redact(reason)
            if result.doubtful(unit):  # its last answer, but the destination may hold it
                said += "; an earlier attempt may have applied it (the row stays in doubt)"
            rows += self._rows_of([unit], "rejected", said, None, handed, batch)
        for (why, _delay), units in left.items():
            left_reason = redactor().redact(why) if why else None
            unknown = [unit for unit in units if result.doubtful(unit)]
            refused = [unit for unit in units if not result.doubtful(unit)]
            rows += self._rows_of(unknown, "unknown", left_reason, None, handed, batch)
            rows += self._rows_of(refused, "refused", left_reason, None, handed, batch)
        return rows

    def _rows_of(
        self,
        units: list[Unit],
        outcome: DeliveryOutcome,
        reason: str | None,
        at: Any,
        handed: list[Any],
        batch: str,
    ) -> list[tuple[Any, ...]]:
        """``deliveries`` tuples (``LOG_COLUMNS``) of these units' messages, with what was
        read for sending them."""
        head = (batch, self.audience_id, self.destination)
        status = _http_status(reason)
        rows: list[tuple[Any, ...]] = []
        for unit in units:
            who = (unit.id_kind, unit.member_id, unit.value, unit.traits)
            tail = (unit.version, outcome, reason, status, handed[1], at)
            for message in unit.messages:
                mid = _message_id(message, unit.version)
                rows.append((mid, _message_type(message), *head, *who, *tail))
        return rows

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
