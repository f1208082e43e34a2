"""alerts: alerts_sent (when each alert last told of a computation's failure)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import Key, UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts_sent",
        sa.Column("alert", Key(100), nullable=False),
        sa.Column("computation", Key(100), nullable=False),
        sa.Column("event", Key(16), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("alert", "computation", "event", name=op.f("pk_alerts_sent")),
    )


def downgrade() -> None:
    op.drop_table("alerts_sent")
