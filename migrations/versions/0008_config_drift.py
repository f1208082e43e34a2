"""config drift: audiences.destinations_hash and destination_endpoints

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import Key, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: audiences synced before this revision get their hash at their next sync (a
    # rename is then recognised by definition_hash alone).
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.add_column(sa.Column("destinations_hash", sa.String(length=64), nullable=True))
    op.create_table(
        "destination_endpoints",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination", Key(100), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_destination_endpoints_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "audience_id", "destination", name=op.f("pk_destination_endpoints")
        ),
    )


def downgrade() -> None:
    op.drop_table("destination_endpoints")
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.drop_column("destinations_hash")
