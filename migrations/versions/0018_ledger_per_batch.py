"""the delivery ledger stored per batch: delivery_batches, and deliveries as its view

A row and an index entry per message sent cost the one SQLite writer ~30% of delivery's time
against a destination that answers at once (README "Delivery ledger" → Cost). The ledger is now
stored as one ``delivery_batches`` row per outcome of a batch, its messages as one JSON array;
``deliveries`` becomes a view with one row per message (the columns it had, plus ``position``:
the message's place in its row; ``id`` is now the ``delivery_batches`` row's, shared by its
messages). ``sent_messages`` is remade over it.

Existing rows are copied one message per row, with their ids (so that ``runs.ledger_from``
still points where it did), and new rows are numbered after them. Rerunnable on MariaDB/MySQL,
where each DDL statement commits at once: a rerun copies what a killed one did not and skips
what is done. The downgrade expands the rows back into a table (new ids in the same order;
``runs.ledger_from`` is cleared, which leaves the counts of runs as recorded).

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.errors import StateError
from sync.state.tables import MYSQL_DIALECTS, Key, UTCDateTime, ValueText, key_collation

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns every form of the view has, after the message's own: the batch row's.
_BATCH = "b.batch_id, b.audience_id, b.destination"
_OUTCOME = "b.outcome, b.reason, b.http_status, b.sent_at, b.acknowledged_at"

# One row per message. SQLite's ``->`` and PostgreSQL's ``json`` keep a value's JSON text
# (SQLite without insignificant spaces); JSON ``null`` traits are SQL NULL, as they were.
DELIVERIES_SQLITE = f"""
CREATE VIEW deliveries AS
SELECT b.id, j.key + 1 AS position, j.value ->> 0 AS message_id,
       j.value ->> 1 AS message_type, {_BATCH}, j.value ->> 2 AS id_kind,
       j.value ->> 3 AS member_id, NULLIF(j.value -> 5, 'null') AS value,
       NULLIF(j.value -> 6, 'null') AS traits, j.value ->> 4 AS version, {_OUTCOME}
FROM delivery_batches b, json_each(b.messages) j
"""
DELIVERIES_POSTGRESQL = f"""
CREATE VIEW deliveries AS
SELECT b.id, j.position, j.e ->> 0 AS message_id, j.e ->> 1 AS message_type, {_BATCH},
       j.e ->> 2 AS id_kind, j.e ->> 3 AS member_id, NULLIF((j.e -> 5)::text, 'null') AS value,
       NULLIF((j.e -> 6)::text, 'null') AS traits, (j.e ->> 4)::integer AS version, {_OUTCOME}
FROM delivery_batches b
CROSS JOIN LATERAL json_array_elements(b.messages::json) WITH ORDINALITY AS j (e, position)
"""
DELIVERIES_MYSQL = f"""
CREATE VIEW deliveries AS
SELECT b.id, j.position, j.message_id, j.message_type, {_BATCH}, j.id_kind, j.member_id,
       NULLIF(j.value, 'null') AS value, NULLIF(j.traits, 'null') AS traits, j.version,
       {_OUTCOME}
FROM delivery_batches b, JSON_TABLE(b.messages, '$[*]' COLUMNS (
    position FOR ORDINALITY,
    message_id VARCHAR(100) PATH '$[0]',
    message_type VARCHAR(16) PATH '$[1]',
    id_kind VARCHAR(16) PATH '$[2]',
    member_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {{collation}} PATH '$[3]',
    version INTEGER PATH '$[4]',
    value JSON PATH '$[5]',
    traits JSON PATH '$[6]')) AS j
"""
SENT_MESSAGES = """
CREATE VIEW sent_messages AS
SELECT d.id, d.position, a.key AS computation, a.kind AS computation_kind, d.destination,
       d.id_kind, d.member_id, d.message_id, d.message_type, d.value, d.traits, d.version,
       d.batch_id, d.sent_at, d.outcome, d.reason, d.http_status, d.acknowledged_at
FROM deliveries d JOIN audiences a ON a.id = d.audience_id
"""
# 0012's, for the downgrade.
SENT_MESSAGES_0012 = """
CREATE VIEW sent_messages AS
SELECT d.id, a.key AS computation, a.kind AS computation_kind, d.destination, d.id_kind,
       d.member_id, d.message_id, d.message_type, d.value, d.traits, d.version, d.batch_id,
       d.sent_at, d.outcome, d.reason, d.http_status, d.acknowledged_at
FROM deliveries d JOIN audiences a ON a.id = d.audience_id
"""

_COLUMNS = (
    "id, batch_id, audience_id, destination, outcome, reason, http_status, sent_at, "
    "acknowledged_at, member_count, messages"
)


def _one_message(dialect: str) -> str:
    """A ``deliveries`` row (alias d) as a one-message ``messages`` array."""
    if dialect == "sqlite":
        return (
            "json_array(json_array(d.message_id, d.message_type, d.id_kind, d.member_id, "
            "d.version, json(COALESCE(d.value, 'null')), json(COALESCE(d.traits, 'null'))))"
        )
    if dialect == "postgresql":
        return (
            "json_build_array(json_build_array(d.message_id, d.message_type, d.id_kind, "
            "d.member_id, d.version, d.value::json, d.traits::json))::text"
        )
    return (
        "CONCAT('[[', JSON_QUOTE(CONVERT(d.message_id USING utf8mb4)), ',', "
        "JSON_QUOTE(CONVERT(d.message_type USING utf8mb4)), ',', "
        "JSON_QUOTE(CONVERT(d.id_kind USING utf8mb4)), ',', "
        "JSON_QUOTE(CONVERT(d.member_id USING utf8mb4)), ',', d.version, ',', "
        "CONVERT(COALESCE(d.value, 'null') USING utf8mb4), ',', "
        "CONVERT(COALESCE(d.traits, 'null') USING utf8mb4), ']]')"
    )


def _base_tables() -> set[str]:
    return set(sa.inspect(op.get_bind()).get_table_names())


def _require_json_table(dialect: sa.Dialect) -> None:
    """MariaDB/MySQL: the view needs ``JSON_TABLE`` (MariaDB 10.6, MySQL 8.0.4); refuse older
    servers before changing anything."""
    if dialect.name not in MYSQL_DIALECTS:
        return
    version = tuple(dialect.server_version_info or ())
    mariadb = getattr(dialect, "is_mariadb", False)
    needed = (10, 6) if mariadb else (8, 0, 4)
    if version < needed:
        server = f"{'MariaDB' if mariadb else 'MySQL'} {'.'.join(map(str, version))}"
        wanted = "MariaDB 10.6" if mariadb else "MySQL 8.0.4"
        raise StateError(
            f"state DB: migration 0018 needs {wanted} or later (JSON_TABLE, for the deliveries "
            f"view); this server is {server}: upgrade it, or keep audience-sync at 0017"
        )


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    _require_json_table(bind.dialect)
    op.create_table(
        "delivery_batches",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination", Key(100), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=False),
        sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
        sa.Column("member_count", sa.Integer(), nullable=False),
        sa.Column(
            "messages",
            sa.Text().with_variant(sa.dialects.mysql.LONGTEXT(), *MYSQL_DIALECTS),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_batches")),
    )
    if "deliveries" in _base_tables():  # not yet a view (a rerun on MariaDB/MySQL may find it so)
        op.execute(
            f"INSERT INTO delivery_batches ({_COLUMNS}) "
            "SELECT d.id, d.batch_id, d.audience_id, d.destination, d.outcome, d.reason, "
            f"d.http_status, d.sent_at, d.acknowledged_at, 1, {_one_message(dialect)} "
            "FROM deliveries d WHERE NOT EXISTS "
            "(SELECT 1 FROM delivery_batches c WHERE c.id = d.id) ORDER BY d.id"
        )
        if dialect == "postgresql":  # new rows are numbered after the copied ones
            op.execute(
                "SELECT setval(pg_get_serial_sequence('delivery_batches', 'id'), "
                "COALESCE((SELECT max(id) FROM delivery_batches), 0) + 1, false)"
            )
        op.execute("DROP VIEW IF EXISTS sent_messages")
        op.drop_index(op.f("ix_deliveries_member_id"), table_name="deliveries")
        op.drop_table("deliveries")
    op.execute("DROP VIEW IF EXISTS sent_messages")
    op.execute("DROP VIEW IF EXISTS deliveries")
    if dialect == "sqlite":
        op.execute(DELIVERIES_SQLITE)
    elif dialect == "postgresql":
        op.execute(DELIVERIES_POSTGRESQL)
    else:
        op.execute(DELIVERIES_MYSQL.format(collation=key_collation(bind.dialect)))
    op.execute(SENT_MESSAGES)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sent_messages")
    tables = _base_tables()
    if "deliveries_0017" not in tables or "delivery_batches" in tables:
        # A rerun on MariaDB/MySQL may find deliveries_0017 made (DDL commits at once) but
        # empty or partly filled: while delivery_batches is there, copy again from scratch
        # (the copy is one INSERT, all or nothing; create_table is skipped when done).
        op.create_table(
            "deliveries_0017",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                autoincrement=True,
                nullable=False,
            ),
            sa.Column("message_id", Key(100), nullable=False),
            sa.Column("message_type", sa.String(length=16), nullable=False),
            sa.Column("batch_id", sa.String(length=32), nullable=False),
            sa.Column("audience_id", sa.Integer(), nullable=False),
            sa.Column("destination", Key(100), nullable=False),
            sa.Column("id_kind", sa.String(length=16), nullable=False),
            sa.Column("member_id", Key(255), nullable=False),
            sa.Column("value", ValueText(), nullable=True),
            sa.Column(
                "traits",
                sa.Text().with_variant(sa.dialects.mysql.LONGTEXT(), *MYSQL_DIALECTS),
                nullable=True,
            ),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("outcome", sa.String(length=16), nullable=False),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("http_status", sa.Integer(), nullable=True),
            sa.Column("sent_at", UTCDateTime(), nullable=False),
            sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        )
        columns = (
            "message_id, message_type, batch_id, audience_id, destination, id_kind, "
            "member_id, value, traits, version, outcome, reason, http_status, sent_at, "
            "acknowledged_at"
        )
        op.execute("DELETE FROM deliveries_0017")
        op.execute(
            f"INSERT INTO deliveries_0017 ({columns}) SELECT {columns} FROM deliveries "
            "ORDER BY id, position"
        )
    op.execute("DROP VIEW IF EXISTS deliveries")
    op.drop_table("delivery_batches")
    op.execute("UPDATE runs SET ledger_from = NULL")
    op.rename_table("deliveries_0017", "deliveries")
    op.create_index(op.f("ix_deliveries_member_id"), "deliveries", ["member_id"], unique=False)
    op.execute(SENT_MESSAGES_0012)
