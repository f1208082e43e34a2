"""No extra traits as SQL NULL on MariaDB/MySQL (as on SQLite and PostgreSQL)

The generic staging path bound ``None`` as the JSON text ``null``, so there memberships and
ledger rows without extra traits held ``null`` where the other state DBs hold NULL: a query
for ``traits IS NULL`` on ``sent_messages`` missed them, and the encoder took its slow path for
every such row. The tables now bind None as NULL (``JSON(none_as_null=True)``); this turns the
stored ``null`` texts into NULL. Nothing to do elsewhere. Rerunnable: the UPDATEs find nothing
the second time.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

from sync.state.tables import MYSQL_DIALECTS

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name not in MYSQL_DIALECTS:
        return
    # JSON_TYPE: on MySQL a JSON column compared with the string 'null' compares JSON values.
    op.execute("UPDATE memberships SET traits = NULL WHERE JSON_TYPE(traits) = 'NULL'")
    op.execute("UPDATE deliveries SET traits = NULL WHERE traits = 'null'")


def downgrade() -> None:
    """Nothing to undo: NULL reads as no extra traits on every revision."""
