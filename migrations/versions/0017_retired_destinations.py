"""retired_destinations: the names a computation retired at one destination still holds there

``retire KEY --destination D`` deletes the computation's rows at D; the names its members
still hold there (an audience's key; a trait group's traits, unless it was retired with
``--send-null``) were then free at D for another computation. A row here keeps them reserved
(DESIGN: a retired key is not reused unless ``allow_key_reuse`` allows it).

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import Key, UTCDateTime, ValueText

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retired_destinations",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination", Key(100), nullable=False),
        sa.Column("names", ValueText(), nullable=False),
        sa.Column("retired_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_retired_destinations_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "audience_id", "destination", name=op.f("pk_retired_destinations")
        ),
    )


def downgrade() -> None:
    op.drop_table("retired_destinations")
