"""daemon heartbeat: daemons and daemon_schedules

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import Key, UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daemons",
        sa.Column("id", Key(255), nullable=False),
        sa.Column("host", Key(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_daemons")),
    )
    op.create_table(
        "daemon_schedules",
        sa.Column("daemon_id", Key(255), nullable=False),
        sa.Column("computation", Key(100), nullable=False),
        sa.Column("next_run_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["daemon_id"],
            ["daemons.id"],
            name=op.f("fk_daemon_schedules_daemon_id_daemons"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("daemon_id", "computation", name=op.f("pk_daemon_schedules")),
    )


def downgrade() -> None:
    op.drop_table("daemon_schedules")
    op.drop_table("daemons")
