"""values: memberships.value/synced_value replace synced; audiences.kind/exit_value; more

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

The membership state generalised from booleans to values (trait groups): ``value`` is the value
a member should have at a destination, ``synced_value`` what the destination last acknowledged,
both canonical JSON text. An audience's rows become ``'true'``/``'false'``, exactly what
``desired``/``synced`` said, so nothing turns pending and the next sync sends nothing.

SQLite and PostgreSQL run this in one transaction. MySQL/MariaDB commit each DDL statement at
once: every step checks whether it is done already, so rerunning a killed upgrade completes it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sync.state.tables import MYSQL_DIALECTS, ValueText

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    # On MariaDB/MySQL not skipped when `kind` exists: a killed upgrade may have added the
    # column but not its CHECK constraint, which sync.state.resumable then adds. (SQLite's
    # downgrade leaves the column: there it is skipped.)
    mysql = op.get_bind().dialect.name in MYSQL_DIALECTS
    if mysql or "kind" not in _columns("audiences"):
        with op.batch_alter_table("audiences", schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(
                    "kind",
                    sa.Enum(
                        "audience",
                        "trait",
                        name="computation_kind",
                        native_enum=False,
                        create_constraint=True,
                        length=16,
                    ),
                    nullable=False,
                    server_default="audience",
                )
            )
    if "exit_value" not in _columns("audiences"):
        with op.batch_alter_table("audiences", schema=None) as batch_op:
            batch_op.add_column(sa.Column("exit_value", ValueText(), nullable=True))
    if "changed" not in _columns("run_deliveries"):
        with op.batch_alter_table("run_deliveries", schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("changed", sa.Integer(), nullable=False, server_default="0")
            )
    if "value" not in _columns("staged_members"):
        with op.batch_alter_table("staged_members", schema=None) as batch_op:
            batch_op.add_column(sa.Column("value", ValueText(), nullable=True))
    for name in ("value", "synced_value"):  # each checked: MySQL may have added one of them
        if name not in _columns("memberships"):
            with op.batch_alter_table("memberships", schema=None) as batch_op:
                batch_op.add_column(sa.Column(name, ValueText(), nullable=True))
    if "synced" in _columns("memberships"):
        op.execute(
            "UPDATE memberships SET "
            "value = CASE WHEN desired THEN 'true' ELSE 'false' END, "
            "synced_value = CASE WHEN synced IS NULL THEN NULL "
            "WHEN synced THEN 'true' ELSE 'false' END"
        )
        with op.batch_alter_table("memberships", schema=None) as batch_op:
            batch_op.drop_column("synced")


def downgrade() -> None:
    # Trait groups' rows have no boolean form: they go with their computations.
    op.execute("DELETE FROM audiences WHERE kind = 'trait'")
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(sa.Column("synced", sa.Boolean(), nullable=True))
    op.execute(
        "UPDATE memberships SET synced = CASE WHEN synced_value IS NULL THEN NULL "
        "WHEN synced_value = 'true' THEN TRUE ELSE FALSE END"
    )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_column("synced_value")
        batch_op.drop_column("value")
    with op.batch_alter_table("staged_members", schema=None) as batch_op:
        batch_op.drop_column("value")
    with op.batch_alter_table("run_deliveries", schema=None) as batch_op:
        batch_op.drop_column("changed")
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.drop_column("exit_value")
        # SQLite: the batch copy cannot drop the column's CHECK constraint (not reflected), so
        # `kind` stays (harmless to 0008; upgrade finds it there).
        if op.get_bind().dialect.name != "sqlite":
            batch_op.drop_column("kind")
