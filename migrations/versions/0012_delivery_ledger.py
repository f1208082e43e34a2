"""delivery ledger: the deliveries table and the sent_messages view

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import Key, UTCDateTime, ValueText

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One text for SQLite, PostgreSQL and MariaDB/MySQL (after a qualifier, MySQL takes the
# reserved word `key` as a column name). README "Delivery ledger" documents it.
SENT_MESSAGES = """
CREATE VIEW sent_messages AS
SELECT d.id, a.key AS computation, a.kind AS computation_kind, d.destination, d.id_kind,
       d.member_id, d.message_id, d.message_type, d.value, d.traits, d.version, d.batch_id,
       d.sent_at, d.outcome, d.reason, d.http_status, d.acknowledged_at
FROM deliveries d JOIN audiences a ON a.id = d.audience_id
"""


def upgrade() -> None:
    op.create_table(
        "deliveries",
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
        sa.Column("traits", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=False),
        sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
    )
    op.create_index(op.f("ix_deliveries_member_id"), "deliveries", ["member_id"], unique=False)
    # MariaDB/MySQL: a killed upgrade may have made it already (each DDL commits at once).
    op.execute("DROP VIEW IF EXISTS sent_messages")
    op.execute(SENT_MESSAGES)


def downgrade() -> None:
    op.execute("DROP VIEW sent_messages")
    op.drop_index(op.f("ix_deliveries_member_id"), table_name="deliveries")
    op.drop_table("deliveries")
