"""Migrations that a killed ``db upgrade`` can resume on MariaDB/MySQL.

Those databases commit each DDL statement at once, so an upgrade killed in the middle of a
revision leaves it half applied, and running the revision again failed on what it had already
done ("Table 'audiences' already exists"). There, each schema operation of a migration first
looks at the live schema and is skipped when it is done already: rerunning ``db upgrade``
completes the revision. SQLite and PostgreSQL migrate in one transaction, never see a
half-applied revision, and run every operation unchanged.

The check sits at Alembic's operation boundary (``Operations.implementation_for``), so
migrations stay plain ``op.create_table``/``op.add_column`` calls; raw SQL (``op.execute``)
and data steps must make themselves safe to rerun (0009, 0010 and 0012 do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alembic.operations import Operations, ops, toimpl
from sqlalchemy import PrimaryKeyConstraint, Table, inspect

from sync.state.tables import MYSQL_DIALECTS


def _live(operations: Operations) -> Any:
    """A fresh inspector (an inspector caches what it read; the schema changes under it)."""
    return inspect(operations.get_bind())


def _on_mysql(operations: Operations) -> bool:
    return operations.get_bind().dialect.name in MYSQL_DIALECTS


def _has_table(operations: Operations, table: str) -> bool:
    return bool(_live(operations).has_table(table))


def _columns(operations: Operations, table: str) -> set[str]:
    if not _has_table(operations, table):
        return set()
    return {column["name"] for column in _live(operations).get_columns(table)}


def _indexes(operations: Operations, table: str) -> set[str]:
    if not _has_table(operations, table):
        return set()
    return {index["name"] for index in _live(operations).get_indexes(table)}


def _constraints(operations: Operations, table: str, kind: str | None) -> set[str]:
    """Names of ``table``'s constraints of ``kind`` (Alembic's ``type_``; None: any)."""
    if not _has_table(operations, table):
        return set()
    live = _live(operations)
    found: list[dict[str, Any]] = []
    if kind in (None, "foreignkey"):
        found += live.get_foreign_keys(table)
    if kind in (None, "unique"):
        found += live.get_unique_constraints(table)
    if kind in (None, "check"):
        found += live.get_check_constraints(table)
    names = {str(item["name"]) for item in found if item.get("name")}
    if kind in (None, "primary"):
        primary = live.get_pk_constraint(table)
        if primary.get("constrained_columns"):
            names.add(str(primary.get("name") or "PRIMARY"))
    return names


def _constraint_done(operations: Operations, operation: ops.AddConstraintOp) -> bool:
    """Whether a constraint of that name exists (a foreign key's op names its table
    ``source_table``)."""
    table = getattr(operation, "table_name", None) or getattr(operation, "source_table", None)
    name = getattr(operation, "constraint_name", None)
    if table is None or name is None:
        return False
    return str(name) in _constraints(operations, str(table), _constraint_kind(operation))


def _constraint_kind(operation: ops.AddConstraintOp) -> str | None:
    """The kind ``_constraints`` reads (an added primary key is ``primarykey`` in Alembic, a
    dropped one ``primary``)."""
    kind = str(operation.constraint_type)
    if kind == "primarykey":
        return "primary"
    return kind if kind in ("foreignkey", "unique", "check") else None  # None: any kind


# Each: the operation, Alembic's own implementation, and whether it is done already.
_CHECKS: list[tuple[type[Any], Callable[..., Any], Callable[[Operations, Any], bool]]] = [
    (ops.CreateTableOp, toimpl.create_table, lambda o, op: _has_table(o, op.table_name)),
    (ops.DropTableOp, toimpl.drop_table, lambda o, op: not _has_table(o, op.table_name)),
    (
        ops.AddColumnOp,
        toimpl.add_column,
        lambda o, op: op.column.name in _columns(o, op.table_name),
    ),
    (
        ops.DropColumnOp,
        toimpl.drop_column,
        lambda o, op: op.column_name not in _columns(o, op.table_name),
    ),
    (
        ops.CreateIndexOp,
        toimpl.create_index,
        lambda o, op: op.index_name in _indexes(o, op.table_name),
    ),
    (
        ops.DropIndexOp,
        toimpl.drop_index,
        lambda o, op: op.index_name not in _indexes(o, op.table_name),
    ),
    (
        ops.AddConstraintOp,
        toimpl.create_constraint,
        _constraint_done,
    ),
    (
        ops.DropConstraintOp,
        toimpl.drop_constraint,
        lambda o, op: op.constraint_name not in _constraints(o, op.table_name, op.constraint_type),
    ),
]


def _complete(operations: Operations, table: Table) -> None:
    """Add what a done ``add_column``/``create_table`` issues as statements of their own and
    a kill may have cut off: ``table``'s named constraints (a Boolean's or an Enum's CHECK)
    and indexes that the live table lacks."""
    name = table.name
    constraints = _constraints(operations, name, None)
    for constraint in table.constraints:
        if isinstance(constraint, PrimaryKeyConstraint) or not isinstance(constraint.name, str):
            continue
        if constraint.name not in constraints:
            operations.impl.add_constraint(constraint)
    indexes = _indexes(operations, name)
    for index in table.indexes:
        if isinstance(index.name, str) and index.name not in indexes:
            operations.impl.create_index(index)


def _resumable(
    implementation: Callable[..., Any], done: Callable[[Operations, Any], bool]
) -> Callable[[Operations, Any], Any]:
    def run(operations: Operations, operation: Any) -> Any:
        if _on_mysql(operations) and done(operations, operation):
            if isinstance(operation, ops.CreateTableOp):  # op.create_table returns the table
                table = operation.to_table(operations.migration_context)
                _complete(operations, table)
                return table
            if isinstance(operation, ops.AddColumnOp):
                column = operation.column
                column = column._copy() if column.table is not None else column
                table = operations.schema_obj.table(
                    operation.table_name, column, schema=operation.schema
                )
                _complete(operations, table)
            return None
        return implementation(operations, operation)

    return run


def install() -> None:
    """Make the schema operations of every migration run from here on resumable on
    MariaDB/MySQL (idempotent; the same operations elsewhere)."""
    for operation, implementation, done in _CHECKS:
        Operations.implementation_for(operation, replace=True)(_resumable(implementation, done))
