"""MySQL/MariaDB: binary collation on ids and keys, microseconds on timestamps

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Until now MySQL/MariaDB created these columns with the database's default collation
(``utf8mb4_general_ci`` on MariaDB), which merges 'CaseA' with 'casea' and 'Müller' with
'muller', and DATETIME without fractions (every run under a second lasted 0.0 s). SQLite and
PostgreSQL already compare exactly and keep microseconds: nothing to do there.

Each table is altered by one ``ALTER TABLE … MODIFY`` (one table rebuild). MySQL commits DDL
at once, so a killed upgrade may leave some tables altered; every statement sets the final
type and is safe to run again, so rerunning ``db upgrade`` completes it.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from sync.state.tables import MYSQL_DIALECTS, Key, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column, key length or None for a timestamp, nullable), per table, as of revision 0006.
COLUMNS: dict[str, list[tuple[str, int | None, bool]]] = {
    "installation": [("installation_id", 32, False), ("created_at", None, False)],
    "audiences": [
        ("key", 100, False),
        ("name", 255, False),
        ("definition_hash", 64, False),
        ("lease_owner", 255, True),
        ("created_at", None, False),
        ("retired_at", None, True),
        ("lease_acquired_at", None, True),
        ("lease_expires_at", None, True),
    ],
    "memberships": [
        ("destination", 100, False),
        ("member_id", 255, False),
        ("anonymous_id", 255, True),
        ("changed_at", None, False),
        ("next_attempt_at", None, True),
        ("delivered_at", None, True),
    ],
    "runs": [("owner", 255, True), ("started_at", None, False), ("finished_at", None, True)],
    "run_deliveries": [("destination", 100, False)],
    "delivery_progress": [
        ("destination", 100, False),
        ("through_member", 255, True),
        ("updated_at", None, False),
    ],
    "staged_members": [("member_id", 255, False), ("anonymous_id", 255, True)],
}


def _modify_all(*, exact: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name not in MYSQL_DIALECTS:
        return
    for table, columns in COLUMNS.items():
        clauses = []
        for name, length, nullable in columns:
            column_type: sa.types.TypeEngine[Any]
            if length is None:
                column_type = UTCDateTime() if exact else sa.DateTime()
            else:
                column_type = Key(length) if exact else sa.String(length)
            ddl = column_type.compile(dialect=bind.dialect)
            clauses.append(f"MODIFY `{name}` {ddl} {'NULL' if nullable else 'NOT NULL'}")
        op.execute(f"ALTER TABLE `{table}` {', '.join(clauses)}")


def upgrade() -> None:
    _modify_all(exact=True)


def downgrade() -> None:
    # Back to the database's default collation: fails on ids that differ only in case or
    # accents (they would be duplicates there), which is the point of this revision.
    _modify_all(exact=False)
