"""config drift: audiences.destinations_hash and destination_endpoints

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0006"
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
        sa.Column("destination", sa.String(length=100), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
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
