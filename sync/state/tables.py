"""State database tables (SQLAlchemy 2.0 typed ORM). The README documents them for SQL users."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sync import clock
from sync.clock import stored_utc
from sync.messages import ComputationClass
from sync.redaction import redactor

# Longest member id we accept (Segment has no documented limit; 255 keeps the primary key
# index compact on every database and fits MySQL's index prefix limits: 255 utf8mb4 characters
# are 1,020 bytes, and InnoDB's limit for one index key is 3,072 bytes).
MAX_MEMBER_ID_LENGTH = 255

# SQLAlchemy names MariaDB "mysql" with the mysql+pymysql:// scheme, "mariadb" with mariadb://.
MYSQL_DIALECTS = ("mysql", "mariadb")
# Binary NO PAD collations: ids compare code point by code point, trailing spaces included, as
# on SQLite and PostgreSQL. MariaDB's default (utf8mb4_general_ci) would merge 'CaseA' with
# 'casea' and 'Müller' with 'muller'; utf8mb4_bin still ignores trailing spaces ('a' = 'a ').
# utf8mb4_nopad_bin exists since MariaDB 10.2, utf8mb4_0900_bin since MySQL 8.0.
MARIADB_KEY_COLLATION = "utf8mb4_nopad_bin"
MYSQL_KEY_COLLATION = "utf8mb4_0900_bin"
# MySQL's DATETIME keeps whole seconds unless given a fractional precision (6 = microseconds).
MYSQL_DATETIME_PRECISION = 6

# interrupted: stopped by Ctrl-C or SIGTERM (the batches in flight finished or were
# abandoned; what was left stays pending).
RunStatus = Literal[
    "running", "succeeded", "partial", "failed", "guarded", "abandoned", "interrupted"
]
RUN_STATUSES: tuple[RunStatus, ...] = (
    "running",
    "succeeded",
    "partial",
    "failed",
    "guarded",
    "abandoned",
    "interrupted",
)
RunTrigger = Literal["manual", "full", "schedule", "sweep", "demo"]
RUN_TRIGGERS: tuple[RunTrigger, ...] = ("manual", "full", "schedule", "sweep", "demo")
# pending: needs delivery; in_sync: destination has (or never needed) the desired value;
# rejected: refused by the destination, retried on a later run; failed: refused max_attempts
# times, waits for `audience-sync retry`; skipped: this destination cannot take the member.
MembershipStatus = Literal["pending", "in_sync", "rejected", "failed", "skipped"]
MEMBERSHIP_STATUSES: tuple[MembershipStatus, ...] = (
    "pending",
    "in_sync",
    "rejected",
    "failed",
    "skipped",
)
IdKind = Literal["user", "anonymous"]
ID_KINDS: tuple[IdKind, ...] = ("user", "anonymous")
# What a computation's members are sent: membership (true/false) or a trait group's values
# (Segment's computation_class).
ComputationKind = ComputationClass
COMPUTATION_KINDS: tuple[ComputationKind, ...] = ("audience", "trait")
# The values of an audience's rows (canonical JSON text).
TRUE_VALUE = "true"
FALSE_VALUE = "false"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def key_collation(dialect: Dialect) -> str:
    """The binary NO PAD collation of ``Key`` columns on a MySQL or MariaDB server."""
    return MARIADB_KEY_COLLATION if getattr(dialect, "is_mariadb", False) else MYSQL_KEY_COLLATION


class Key(TypeDecorator[str]):
    """Text that identifies something (a member id, a key, a destination or lease owner name):
    ``VARCHAR(length)``, compared exactly (case, accents and trailing spaces count) on every
    state database. Use it for every new id or key column."""

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in MYSQL_DIALECTS:
            return mysql.VARCHAR(self.length, charset="utf8mb4", collation=key_collation(dialect))
        return self.impl_instance


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (SQLite keeps no zone),
    with microseconds on every database."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in MYSQL_DIALECTS:
            return mysql.DATETIME(timezone=True, fsp=MYSQL_DATETIME_PRECISION)
        return self.impl_instance

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name != "postgresql" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else stored_utc(value)


class ValueText(TypeDecorator[str]):
    """A value as canonical JSON text (``true``, ``false``, a trait group's row object),
    compared byte for byte on every state database: on MySQL and MariaDB a binary NO PAD
    collation, since their default would find ``{"plan":"Pro"}`` equal to ``{"plan":"pro"}``."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in MYSQL_DIALECTS:
            return mysql.MEDIUMTEXT(charset="utf8mb4", collation=key_collation(dialect))
        return self.impl_instance


class RedactedText(TypeDecorator[str]):
    """Free text (errors) that passes through the process's redactor on its way in: no
    writer, present or future, can store a secret in it."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else redactor().redact(value)


class RedactedJSON(TypeDecorator[Any]):
    """JSON whose strings pass through the process's redactor on their way in; None is SQL
    NULL (SQLAlchemy's JSON would store the JSON text ``null``)."""

    impl = JSON
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(none_as_null=True)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else redactor().redact_tree(value)


def utcnow() -> datetime:
    """This host's current time, timezone-aware, in UTC (``sync.clock.local_now``; what hosts
    compare goes through ``sync.clock.state_now`` instead)."""
    return clock.local_now()


def _enum(values: tuple[str, ...], name: str) -> Enum:
    return Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Installation(Base):
    """One row: this state database's identity, part of every messageId."""

    __tablename__ = "installation"

    installation_id: Mapped[str] = mapped_column(Key(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Audience(Base):
    """A computation (an audience or a trait group) known to the state DB; its key is frozen at
    creation. Audience and trait group keys share this table's one namespace."""

    __tablename__ = "audiences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Key(100), unique=True)
    kind: Mapped[ComputationKind] = mapped_column(
        _enum(COMPUTATION_KINDS, "computation_kind"), default="audience", server_default="audience"
    )
    name: Mapped[str] = mapped_column(Key(255))
    definition_hash: Mapped[str] = mapped_column(Key(64))
    # sha256 of the sorted destination names at the last sync: with ``definition_hash`` it
    # recognises a renamed audience (sync.run.drift). NULL for audiences last synced before 0008.
    destinations_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A trait group's leaver value (every trait of its last run's columns null), for
    # `retire --send-null`; NULL for audiences.
    exit_value: Mapped[str | None] = mapped_column(ValueText, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(Key(255), nullable=True)
    lease_acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Membership(Base):
    """What one member's value should be at one destination, and what it last acknowledged.

    ``desired`` says whether the member is in the computation's result now; ``value`` is the
    value it should have at the destination (canonical JSON: ``true``/``false`` for an audience,
    the row's object for a trait group, all nulls for a trait group's leaver); ``synced_value``
    is the value the destination last acknowledged (NULL: none ever). Pending = the two differ
    (a never-acknowledged row only while its member is in the result) or ``in_doubt``."""

    __tablename__ = "memberships"
    __table_args__ = (
        # Delivery reads "pending rows of one audience and destination, in member order".
        Index(
            "ix_memberships_delivery",
            "audience_id",
            "destination",
            "status",
            "id_kind",
            "member_id",
        ),
        # `audience-sync user ID` reads every row of one member.
        Index("ix_memberships_member_id", "member_id"),
    )

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination: Mapped[str] = mapped_column(Key(100), primary_key=True)
    id_kind: Mapped[IdKind] = mapped_column(_enum(ID_KINDS, "id_kind"), primary_key=True)
    member_id: Mapped[str] = mapped_column(Key(MAX_MEMBER_ID_LENGTH), primary_key=True)
    anonymous_id: Mapped[str | None] = mapped_column(Key(MAX_MEMBER_ID_LENGTH), nullable=True)
    desired: Mapped[bool] = mapped_column(Boolean)
    value: Mapped[str | None] = mapped_column(ValueText, nullable=True)
    synced_value: Mapped[str | None] = mapped_column(ValueText, nullable=True)
    # True from the moment a message for this row is handed to the destination until it is
    # acknowledged: the destination may hold a value we never saw confirmed (a crash, a lost
    # response), so the row stays pending whatever `desired` becomes.
    in_doubt: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # No extra traits is SQL NULL on every state DB (SQLAlchemy binds None as the JSON text
    # 'null' unless told: MariaDB's rows, read back as text, took the encoder's slow path).
    traits: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    status: Mapped[MembershipStatus] = mapped_column(
        _enum(MEMBERSHIP_STATUSES, "membership_status")
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Run(Base):
    """One execution for one audience: compute → plan → deliver, with its counts and outcome."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_audience_id_started_at", "audience_id", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id", ondelete="CASCADE"))
    trigger: Mapped[RunTrigger] = mapped_column(_enum(RUN_TRIGGERS, "run_trigger"))
    status: Mapped[RunStatus] = mapped_column(_enum(RUN_STATUSES, "run_status"))
    owner: Mapped[str | None] = mapped_column(Key(255), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    members: Mapped[int] = mapped_column(Integer, default=0)
    added: Mapped[int] = mapped_column(Integer, default=0)
    removed: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    compute_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    plan_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    deliver_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)
    invalid_samples: Mapped[list[str] | None] = mapped_column(RedactedJSON, nullable=True)
    # The last ``deliveries`` id when the run started (0: none): its own ledger rows come
    # after, which is how an abandoned run's sent count is found (``abandon_runs``).
    ledger_from: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RunDelivery(Base):
    """What one run did for one destination."""

    __tablename__ = "run_deliveries"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    destination: Mapped[str] = mapped_column(Key(100), primary_key=True)
    added: Mapped[int] = mapped_column(Integer, default=0)
    removed: Mapped[int] = mapped_column(Integer, default=0)
    # A trait group's continuing members whose values changed.
    changed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    left_pending: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(RedactedText, nullable=True)


class DeliveryProgress(Base):
    """How far a delivery in progress has handed rows to one destination.

    Advanced (and committed) before each page of pending rows is sent and deleted when
    delivery ends normally, so after a crash it bounds the rows the destination may hold
    unacknowledged: the next run marks the unacknowledged rows up to it ``in_doubt`` before
    planning. One small write per page instead of marking every row before it is sent.
    """

    __tablename__ = "delivery_progress"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination: Mapped[str] = mapped_column(Key(100), primary_key=True)
    # The greatest (id_kind, member_id) handed over so far; NULL before the first batch.
    through_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    through_member: Mapped[str | None] = mapped_column(Key(MAX_MEMBER_ID_LENGTH), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StagedMember(Base):
    """A run's snapshot of the audience query, between compute and plan (then deleted)."""

    __tablename__ = "staged_members"
    # SQLite: rows live in the primary key's B-tree, one write per staged row (migration 0006).
    __table_args__ = {"sqlite_with_rowid": False}

    # A run's id, without a foreign key: SQLite deletes a table with one row by row instead of
    # emptying it at once (see planner.drop_staging); runs are never deleted.
    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_kind: Mapped[IdKind] = mapped_column(_enum(ID_KINDS, "staged_id_kind"), primary_key=True)
    member_id: Mapped[str] = mapped_column(Key(MAX_MEMBER_ID_LENGTH), primary_key=True)
    anonymous_id: Mapped[str | None] = mapped_column(Key(MAX_MEMBER_ID_LENGTH), nullable=True)
    # No extra traits is SQL NULL on every state DB (SQLAlchemy binds None as the JSON text
    # 'null' unless told: MariaDB's rows, read back as text, took the encoder's slow path).
    traits: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # A trait group's row values (canonical JSON text); NULL for an audience.
    value: Mapped[str | None] = mapped_column(ValueText, nullable=True)


class DestinationEndpoint(Base):
    """The endpoint an audience's rows at one destination were planned against.

    ``fingerprint`` is the sha256 of the destination's type, scheme, host, port and path (never
    credentials, query or write key; see sync.run.drift): a destination whose URL changed under the
    same name would otherwise get only the changes.
    """

    __tablename__ = "destination_endpoints"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination: Mapped[str] = mapped_column(Key(100), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RetiredDestination(Base):
    """The names a computation retired at one destination (``retire KEY --destination D``,
    which deletes its rows there) still holds there: an audience's key, a trait group's traits
    unless it was retired with its nulls delivered (then there is no row). ``names`` is a JSON
    array; they stay reserved at that destination for other computations
    (``sync.run.compute``), as a wholly retired computation's do."""

    __tablename__ = "retired_destinations"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination: Mapped[str] = mapped_column(Key(100), primary_key=True)
    names: Mapped[str] = mapped_column(ValueText)
    retired_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DaemonRecord(Base):
    """A running ``audience-sync run`` process: inserted at start, its ``heartbeat_at``
    renewed on the state database's clock while it lives, deleted on a clean stop. A row
    whose heartbeat is old belongs to a daemon that died (sync.state.daemons)."""

    __tablename__ = "daemons"

    # host:pid:random, like a lease owner (a host name may be long).
    id: Mapped[str] = mapped_column(Key(255), primary_key=True)
    host: Mapped[str] = mapped_column(Key(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DaemonSchedule(Base):
    """When a daemon will next run a computation (an audience, later a trait group), as its
    scheduler says; rewritten with every heartbeat, gone with the daemon's row."""

    __tablename__ = "daemon_schedules"

    daemon_id: Mapped[str] = mapped_column(
        ForeignKey("daemons.id", ondelete="CASCADE"), primary_key=True
    )
    computation: Mapped[str] = mapped_column(Key(100), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AlertSent(Base):
    """When an alert last told its receiver about a computation's failed, guarded or partial
    runs: the repeat interval counts from it, whichever process sent it (sync.alerts). A
    computation's rows are deleted when it recovers, so its next failure alerts at once."""

    __tablename__ = "alerts_sent"

    alert: Mapped[str] = mapped_column(Key(100), primary_key=True)
    computation: Mapped[str] = mapped_column(Key(100), primary_key=True)
    event: Mapped[str] = mapped_column(Key(16), primary_key=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)


# What became of one message (the delivery ledger): the destination acknowledged it;
# rejected it (400/413/422, or it was too big to send: the reason says); refused it for now
# (a 429, a refused connection, out of time: it was not applied, the row is retried); or its
# fate is unknown (a timeout, a lost response, a 5xx: the row stays in doubt).
DeliveryOutcome = Literal["acknowledged", "rejected", "refused", "unknown"]
DELIVERY_OUTCOMES: tuple[DeliveryOutcome, ...] = ("acknowledged", "rejected", "refused", "unknown")
# The view over `deliveries` that answers "what was sent to U" (migration 0012, README
# "Delivery ledger").
SENT_MESSAGES_VIEW = "sent_messages"
# Each message of a ``delivery_batches`` row, as the elements of its ``messages`` array.
LEDGER_MESSAGE_FIELDS = (
    "message_id",
    "message_type",
    "id_kind",
    "member_id",
    "version",
    "value",
    "traits",
)


class DeliveryBatch(Base):
    """The delivery ledger as stored: one row per outcome of a batch (usually one per batch:
    its acknowledgement), its messages as one JSON array of ``LEDGER_MESSAGE_FIELDS`` arrays
    (value and traits as the JSON they were sent as). Appended in the transaction that records
    the outcome and pruned after ``[state] keep_deliveries``; read through the view
    ``deliveries`` (one row per message, migration 0018).

    Per batch, not per message: a row and an index entry per message cost the one SQLite
    writer ~30% of delivery's time at zero latency (README "Delivery ledger" → Cost). No
    foreign key to ``audiences`` (computations are never deleted). Rows are appended in ``id``
    order, which pruning walks instead of an index on ``sent_at``."""

    __tablename__ = "delivery_batches"

    # INTEGER PRIMARY KEY on SQLite: the rowid itself.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # The batch (one request, or the halves an isolating split sent) the messages went in.
    batch_id: Mapped[str] = mapped_column(String(32))
    audience_id: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(Key(100))
    outcome: Mapped[str] = mapped_column(String(16))
    # The destination's reason (redacted) for anything but an acknowledgement.
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # When its page was handed to the senders (the state DB's clock): it left at or after this.
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # How many members' messages ``messages`` holds (a member in ``mode = "both"`` has two:
    # the identify and the track): counts without expanding it.
    member_count: Mapped[int] = mapped_column(Integer)
    # LONGTEXT on MariaDB/MySQL: TEXT holds 64 KB.
    messages: Mapped[str] = mapped_column(Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS))


# Core handles for the bulk paths (set operations, executemany), typed as tables.
MEMBERSHIPS = cast(Table, Membership.__table__)
STAGED = cast(Table, StagedMember.__table__)
RUNS = cast(Table, Run.__table__)
AUDIENCES = cast(Table, Audience.__table__)
INSTALLATION = cast(Table, Installation.__table__)
RUN_DELIVERIES = cast(Table, RunDelivery.__table__)
DELIVERY_PROGRESS = cast(Table, DeliveryProgress.__table__)
DESTINATION_ENDPOINTS = cast(Table, DestinationEndpoint.__table__)
RETIRED_DESTINATIONS = cast(Table, RetiredDestination.__table__)
DAEMONS = cast(Table, DaemonRecord.__table__)
DAEMON_SCHEDULES = cast(Table, DaemonSchedule.__table__)
ALERTS_SENT = cast(Table, AlertSent.__table__)


DELIVERY_BATCHES = cast(Table, DeliveryBatch.__table__)

# The view ``deliveries`` (migration 0018): one row per message of ``delivery_batches``, the
# ledger as people query it. Not in ``Base.metadata``: a view, made by its migration.
DELIVERIES = Table(
    "deliveries",
    MetaData(),
    Column("id", BigInteger),  # the delivery_batches row
    Column("position", Integer),  # the message's place in it, from 1
    Column("message_id", String),
    Column("message_type", String),
    Column("batch_id", String),
    Column("audience_id", Integer),
    Column("destination", String),
    Column("id_kind", String),
    Column("member_id", String),
    Column("value", Text),
    Column("traits", Text),
    Column("version", Integer),
    Column("outcome", String),
    Column("reason", Text),
    Column("http_status", Integer),
    Column("sent_at", UTCDateTime),
    Column("acknowledged_at", UTCDateTime),
)
