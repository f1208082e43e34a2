"""staged_members unlogged on PostgreSQL (transient rows need no write-ahead log)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A crash empties an unlogged table, which is what a run's staging needs anyway: the next
    # run stages again. Other databases have no such table kind.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE staged_members SET UNLOGGED")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE staged_members SET LOGGED")
