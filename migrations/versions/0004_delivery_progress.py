"""delivery progress: one row per delivery in progress instead of marking rows before sending

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import sync.state.tables

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_progress",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=100), nullable=False),
        sa.Column("through_kind", sa.String(length=16), nullable=True),
        sa.Column("through_member", sa.String(length=255), nullable=True),
        sa.Column("updated_at", sync.state.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_delivery_progress_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("audience_id", "destination", name=op.f("pk_delivery_progress")),
    )


def downgrade() -> None:
    op.drop_table("delivery_progress")
