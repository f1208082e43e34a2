"""Plan: turn a staged snapshot into membership changes with set operations, in one transaction.

Entrants are inserted, re-entrants flipped, leavers marked ``desired = false`` (with their exit
value), a trait group's changed rows given their new values; every change bumps ``version`` and
resets delivery bookkeeping. Nothing here sends anything.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    update,
)

from sync.reports import DestinationReport
from sync.state.memberships import (
    DELIVERY_RESET,
    DestinationTarget,
    count_members,
    leaver_status,
    of_destination,
    status_for,
)
from sync.state.tables import FALSE_VALUE, RUNS, TRUE_VALUE, ComputationKind
from sync.state.tables import MEMBERSHIPS as M
from sync.state.tables import STAGED as S


def _staged_match(run_id: int, *more: Any) -> Any:
    return exists().where(
        S.c.run_id == run_id,
        S.c.id_kind == M.c.id_kind,
        S.c.member_id == M.c.member_id,
        *more,
    )


def _staged_value(run_id: int, column: Any) -> Any:
    return (
        select(column)
        .where(S.c.run_id == run_id, S.c.id_kind == M.c.id_kind, S.c.member_id == M.c.member_id)
        .scalar_subquery()
    )


def removal_problem(
    plan: DestinationReport,
    staged: int,
    *,
    max_removal_ratio: float,
    min_members: int,
    audience_name: str,
    force_command: str | None = None,
) -> str | None:
    """Why a planned destination must not be committed unforced (a mass removal, an emptied
    audience), or None. Judged from the plan itself: its leavers are the removals, so no
    separate anti-join counts them first. ``force_command``: the command the hint gives
    (``Config.command_line``, which repeats the user's ``--config``)."""
    current, removed = plan.current, plan.removed
    if current == 0 or current < min_members:
        return None
    command = force_command or f"audience-sync sync --force {shlex.quote(audience_name)}"
    hint = f"check the source, then run `{command}`"
    if staged == 0:
        return (
            f"the query returned no members; this would remove all {current} members at "
            f'destination "{plan.destination}"; {hint}'
        )
    if removed / current > max_removal_ratio:
        return (
            f"this run would remove {removed} of {current} members "
            f'({removed / current:.0%}) at destination "{plan.destination}", more than '
            f"max_removal_ratio {max_removal_ratio:.0%}; {hint}"
        )
    return None


def retirement_problem(
    connection: Connection,
    audience_id: int,
    destinations: list[str],
    *,
    key: str,
    name: str,
    max_removal_ratio: float,
    min_members: int,
    kind: str = "audience",
    command_line: Callable[..., str] | None = None,
) -> str | None:
    """The removal guard's verdict on sending ``false`` to all of a removed audience's members
    (``on_removed = "retire"``): the same rule as a run's (``removal_problem``)."""
    for destination in destinations:
        current = count_members(connection, audience_id, destination)
        plan = DestinationReport(destination, current=current, removed=current)
        guarded = removal_problem(
            plan,
            current,
            max_removal_ratio=max_removal_ratio,
            min_members=min_members,
            audience_name=name,
        )
        if guarded:
            label, what, flag = (
                ("trait group", "nulls", "--send-null")
                if kind == "trait"
                else ("audience", "false", "--send-false")
            )
            line = command_line or (lambda *args: shlex.join(["audience-sync", *args]))
            force, retire = line("sync", "--force"), line("retire", key, flag)
            return (
                f'{label} "{key}" was removed from the config, and on_removed = "retire" '
                f'would send {what} to all its {current} members at destination "{destination}", '
                f"more than max_removal_ratio {max_removal_ratio:.0%}; run `{force}` to retire "
                f"it anyway, or `{retire}`"
            )
    return None


@dataclass(frozen=True)
class ValueRule:
    """What a computation's members are sent: an audience's ``true``/``false``, or a trait
    group's row values (``exit_value``: a leaver's all-null row; None: leavers keep theirs)."""

    kind: ComputationKind = "audience"
    exit_value: str | None = FALSE_VALUE

    def entered(self) -> Any:
        """The value of a staged member."""
        return literal(TRUE_VALUE) if self.kind == "audience" else S.c.value

    def left(self) -> Any:
        """The value of a member who left: ``exit_value``; with ``on_exit = "keep"``, what the
        destination holds (nothing to send), unless in doubt (the row's value is resent)."""
        if self.exit_value is not None:
            return literal(self.exit_value)
        return case((M.c.in_doubt == true(), M.c.value), else_=M.c.synced_value)


AUDIENCE_VALUES = ValueRule()


def plan_destination(
    connection: Connection,
    audience_id: int,
    run_id: int,
    target: DestinationTarget,
    now: datetime,
    rule: ValueRule = AUDIENCE_VALUES,
) -> DestinationReport:
    """Apply the staged snapshot to one destination's memberships; the report's ``current``,
    ``added`` and ``removed`` say what changed (and ``changed``: trait values of continuing
    members)."""
    # Over 60 lines on purpose: its set-based statements (leavers, value changes, re-entrants,
    # entrants) run in this order inside the plan's one transaction, each reading what the
    # previous one left; split up, that order would be spread over helpers that only make
    # sense in it. Each statement is commented below.
    plan = DestinationReport(target.name)
    plan.current = count_members(connection, audience_id, target.name)
    of = of_destination(audience_id, target.name)
    bump = {"version": M.c.version + 1, "changed_at": now, **DELIVERY_RESET}
    joined = (S.c.run_id == run_id, S.c.id_kind == M.c.id_kind, S.c.member_id == M.c.member_id)

    left = rule.left()
    leavers = connection.execute(
        update(M)
        .where(of, M.c.desired == true(), ~_staged_match(run_id))
        .values(desired=False, value=left, status=leaver_status(target, left), **bump)
    )
    plan.removed = leavers.rowcount

    # Continuing members keep their version; only their traits follow the source, so that a
    # later `false` carries the latest e-mail.
    # UPDATE … FROM: one join instead of a correlated lookup per member.
    if rule.kind == "audience":
        connection.execute(
            update(M)
            .where(
                of,
                M.c.desired == true(),
                *joined,
                func.coalesce(cast(S.c.traits, Text), "").is_distinct_from(
                    func.coalesce(cast(M.c.traits, Text), "")
                ),
            )
            .values(traits=S.c.traits)
        )
    else:
        # A trait group's continuing member whose values changed: the new values, a new
        # version (a change twice before delivery sends only the latest).
        changed = connection.execute(
            update(M)
            .where(of, M.c.desired == true(), *joined, S.c.value != M.c.value)
            .values(value=S.c.value, status=status_for(target, S.c.value, true()), **bump)
        )
        plan.changed = changed.rowcount

    entered = _staged_value(run_id, S.c.value) if rule.kind == "trait" else rule.entered()
    # A trait group's row staged without values (invalid values, sync.run.staging.HeldRow)
    # keeps its member where it is: not a leaver above, neither a re-entrant nor an entrant.
    with_values = [S.c.value.is_not(None)] if rule.kind == "trait" else []
    reentrants = connection.execute(
        update(M)
        .where(of, M.c.desired == False, _staged_match(run_id, *with_values))  # noqa: E712
        .values(
            desired=True,
            value=entered,
            status=status_for(target, entered, true()),
            traits=_staged_value(run_id, S.c.traits),
            anonymous_id=_staged_value(run_id, S.c.anonymous_id),
            **bump,
        )
    )
    entrant_status: Any = literal("pending")
    if target.requires_user_id:
        entrant_status = case((S.c.id_kind == "anonymous", "skipped"), else_="pending")
    snapshot = and_(S.c.run_id == run_id, *with_values)
    if connection.execute(select(exists().where(of))).scalar():
        # Only staged members without a row are entrants (an anti-join on the key). A first
        # plan needs none: on PostgreSQL, an anti-join against the table being inserted into
        # may be planned as a loop that re-reads every row the statement appends (quadratic).
        snapshot = and_(
            snapshot,
            ~exists().where(of, M.c.id_kind == S.c.id_kind, M.c.member_id == S.c.member_id),
        )
    # The lease keeps other writers out, so a plain INSERT (ON CONFLICT's speculative
    # insertion costs PostgreSQL about twice as much per row).
    insert_entrants: Any = insert(M)
    entrants = connection.execute(
        insert_entrants.from_select(
            [
                "audience_id",
                "destination",
                "id_kind",
                "member_id",
                "anonymous_id",
                "desired",
                "value",
                "synced_value",
                "in_doubt",
                "version",
                "changed_at",
                "traits",
                "status",
                "attempts",
            ],
            select(
                literal(audience_id),
                literal(target.name),
                S.c.id_kind,
                S.c.member_id,
                S.c.anonymous_id,
                literal(True),
                rule.entered(),
                literal(None, M.c.synced_value.type),
                literal(False),
                literal(1),
                literal(now, M.c.changed_at.type),
                S.c.traits,
                entrant_status,
                literal(0),
            ).where(snapshot),
        ),
        execution_options={"preserve_rowcount": True},
    )
    plan.added = reentrants.rowcount + entrants.rowcount
    return plan


def drop_staging(
    connection: Connection, audience_id: int, *, holds_write_lock: bool = False
) -> None:
    """Delete staged snapshots of this audience (a run's own, or those crashed runs left).

    ``holds_write_lock``: this SQLite transaction has already written (the plan), so no other
    run can stage until it commits. If no other run's rows are staged, the table is emptied
    whole — SQLite frees its pages at once, where deleting a million rows one by one took an
    eighth of a plan.
    """
    runs = select(RUNS.c.id).where(RUNS.c.audience_id == audience_id)
    if connection.dialect.name in ("mysql", "mariadb"):
        # InnoDB locks every row a DELETE's subquery plan walks, other audiences' staged rows
        # included, which their concurrent plans hold: two plans deadlocked. Read which runs
        # have staged rows (a consistent read takes no lock), then delete by those keys only.
        staged = connection.execute(select(S.c.run_id).distinct()).scalars().all()
        mine = connection.execute(runs.where(RUNS.c.id.in_(staged))).scalars().all()
        if mine:
            connection.execute(delete(S).where(S.c.run_id.in_(mine)))
        return
    if holds_write_lock and connection.dialect.name == "sqlite":
        others = select(S.c.run_id).where(S.c.run_id.not_in(runs)).limit(1)
        if connection.execute(others).first() is None:
            connection.execute(delete(S))
            return
    connection.execute(delete(S).where(S.c.run_id.in_(runs)))
