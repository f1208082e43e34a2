"""runs.status: interrupted (a run stopped by Ctrl-C or SIGTERM)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

``runs.status`` is a non-native enum: a VARCHAR(16) with a CHECK constraint listing its
values. Adding one replaces the constraint (SQLite: by copying the table, in the upgrade's
transaction; MySQL/MariaDB: drop, then add, each committed at once; a killed upgrade may leave
runs without the constraint, and rerunning `db upgrade` adds it). Downgrading turns interrupted
runs into failed ones first, as they were recorded before this revision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import MYSQL_DIALECTS

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The CHECK constraint's name (the metadata's naming convention: ck_<table>_<enum name>).
CONSTRAINT = "ck_runs_run_status"
BEFORE = ("running", "succeeded", "partial", "failed", "guarded", "abandoned")
AFTER = (*BEFORE, "interrupted")


def _status(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name="run_status", native_enum=False, create_constraint=True, length=16)


def _replace_constraint(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name in MYSQL_DIALECTS:
        # Alembic leaves the old constraint on MySQL/MariaDB (a duplicate name then): swap it.
        listed = ", ".join(f"'{value}'" for value in after)
        present = {c["name"] for c in sa.inspect(op.get_bind()).get_check_constraints("runs")}
        if CONSTRAINT in present:  # absent when a killed upgrade is rerun
            op.drop_constraint(op.f(CONSTRAINT), "runs", type_="check")
        op.create_check_constraint(op.f(CONSTRAINT), "runs", sa.text(f"status IN ({listed})"))
        return
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column(
            "status", existing_type=_status(before), type_=_status(after), existing_nullable=False
        )


def upgrade() -> None:
    _replace_constraint(BEFORE, AFTER)


def downgrade() -> None:
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'interrupted'")
    _replace_constraint(AFTER, BEFORE)
