"""runs.ledger_from: where a run's delivery ledger rows start

The last ``deliveries`` id when the run started (0 for an empty ledger): a run killed
mid-delivery is marked ``abandoned`` by its successor, which counts what it sent from the
ledger rows after it (a range of the primary key, no scan of older rows). NULL for runs
recorded before 0016, whose counts stay as they were.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ledger_from", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("ledger_from")
