"""deliveries.traits as LONGTEXT on MariaDB/MySQL (as memberships.traits is)

TEXT holds 64 KB there: a member with more traits than that was sent (without them, trimmed)
and acknowledged, then the ledger row's insert failed and undid the acknowledgement, so every
run resent the batch. Nothing to do on SQLite and PostgreSQL, whose text has no such limit.
Rerunnable: MODIFY to the same type is a no-op.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from sync.state.tables import MYSQL_DIALECTS

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _retype(sa.Text(), mysql.LONGTEXT())


def downgrade() -> None:
    _retype(mysql.LONGTEXT(), sa.Text())


def _retype(existing: sa.types.TypeEngine[str], new: sa.types.TypeEngine[str]) -> None:
    if op.get_bind().dialect.name in MYSQL_DIALECTS:
        op.alter_column(
            "deliveries", "traits", existing_type=existing, type_=new, existing_nullable=True
        )
