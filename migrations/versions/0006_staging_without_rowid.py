"""staged_members WITHOUT ROWID on SQLite, and without a foreign key to runs

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create(*, with_rowid: bool, foreign_key: bool) -> None:
    constraints: list[sa.Constraint] = []
    if foreign_key:
        constraints.append(
            sa.ForeignKeyConstraint(
                ["run_id"],
                ["runs.id"],
                name=op.f("fk_staged_members_run_id_runs"),
                ondelete="CASCADE",
            )
        )
    op.create_table(
        "staged_members",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column(
            "id_kind",
            sa.Enum(
                "user",
                "anonymous",
                name="staged_id_kind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("anonymous_id", sa.String(length=255), nullable=True),
        sa.Column("traits", sa.JSON(), nullable=True),
        *constraints,
        sa.PrimaryKeyConstraint("run_id", "id_kind", "member_id", name=op.f("pk_staged_members")),
        sqlite_with_rowid=with_rowid,
    )


def upgrade() -> None:
    # Staging is transient (emptied after every plan), so on SQLite the table is simply
    # recreated: one B-tree to write per staged row instead of the table plus its primary key
    # index. No foreign key: SQLite will not empty a table that has one at once (it deletes row
    # by row), and runs are never deleted anyway.
    if op.get_bind().dialect.name == "sqlite":
        op.drop_table("staged_members")
        _create(with_rowid=False, foreign_key=False)
    else:
        op.drop_constraint("fk_staged_members_run_id_runs", "staged_members", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_table("staged_members")
        _create(with_rowid=True, foreign_key=True)
    else:
        op.create_foreign_key(
            "fk_staged_members_run_id_runs",
            "staged_members",
            "runs",
            ["run_id"],
            ["id"],
            ondelete="CASCADE",
        )
