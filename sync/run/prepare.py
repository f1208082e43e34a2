"""A run's steps between computing its snapshot and sending: plan every destination under
the removal guard, then commit the plan together with the run's planned counts (or, when the
guard refuses, roll it back and record the run ``guarded``). A dry run plans the same way into
its scratch copy and commits nothing."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection

from sync.clock import state_now
from sync.config import ComputationConfig, Config, TraitGroupConfig
from sync.delivery import recover_in_flight
from sync.reports import DestinationReport, RunOptions, RunReport
from sync.run.drift import record_endpoints
from sync.run.plan import (
    AUDIENCE_VALUES,
    ValueRule,
    drop_staging,
    plan_destination,
    removal_problem,
)
from sync.run.record import record_run
from sync.run.stage_table import refresh_statistics
from sync.run.staging import SnapshotStats
from sync.run.trait_values import exit_value
from sync.state.leases import Lease
from sync.state.memberships import DestinationTarget, count_status, mark_full_resync, pending_in

# Above this many changed rows, PostgreSQL's statistics are refreshed before delivery (a first
# sync grows memberships from nothing; plans made for an empty table scan it per batch).
PLANNER_STATISTICS_THRESHOLD = 10_000

# Called after each destination is planned, before the plan commits; raises to stop the run.
AfterPlan = Callable[[], None]


def plan_destinations(
    connection: Connection,
    config: Config,
    audience: ComputationConfig,
    audience_id: int,
    run_id: int,
    targets: list[DestinationTarget],
    stats: SnapshotStats,
    options: RunOptions,
    after_plan: AfterPlan | None = None,
) -> tuple[str | None, list[DestinationReport]]:
    """Plan each destination from the staged snapshot, uncommitted; return the guard's
    objection (and no plans: the caller rolls back) or the plans."""
    # Before the plan: a leaver's status depends on whether its row is in doubt.
    recover_in_flight(connection, audience_id)
    now = state_now(connection)  # changed_at: one clock for every host
    rule = AUDIENCE_VALUES
    if audience.is_trait_group:
        nulls = exit_value(stats.trait_names)  # stored when compute claimed the trait names
        keep = isinstance(audience, TraitGroupConfig) and audience.on_exit == "keep"
        rule = ValueRule("trait", None if keep else nulls)
    plans = []
    for target in targets:
        plan = plan_destination(connection, audience_id, run_id, target, now, rule)
        if after_plan is not None:
            after_plan()
        problem = removal_problem(
            plan,
            stats.staged,
            max_removal_ratio=config.max_removal_ratio_of(audience),
            min_members=config.guard_min_members_of(audience),
            audience_name=audience.name,
            force_command=config.command_line("sync", "--force", audience.name),
        )
        if problem and not options.force:
            return problem, []  # the caller rolls the plan back
        if options.full:
            mark_full_resync(
                connection, audience_id, target, now, include_exited=options.include_exited
            )
        counts = count_status(connection, audience_id, target.name)
        plan.pending = pending_in(counts)
        plan.skipped = counts.get("skipped", 0)
        plans.append(plan)
    if not options.dry_run:  # a dry run writes nothing another run could wait for
        record_endpoints(connection, config, audience_id, [t.name for t in targets], now)
    return None, plans


def end_planning(connection: Connection, audience_id: int, *, guarded: bool) -> None:
    """Roll a guarded plan back, and drop the run's staged snapshot (uncommitted: it goes
    with the plan's commit)."""
    if guarded:
        connection.rollback()
    drop_staging(connection, audience_id, holds_write_lock=not guarded)


def commit_plan(
    connection: Connection,
    report: RunReport,
    timings: dict[str, float],
    lease: Lease,
) -> None:
    """Commit the plan with the run's planned counts, before any send, fenced by the lease;
    a guarded run (``report.status == "guarded"``) is recorded as finished instead."""
    if report.status == "guarded":
        record_run(connection, report, timings, lease)
        connection.commit()
        return
    record_run(connection, report, timings, lease, still_running=True)
    connection.commit()
    changed = sum(d.added + d.removed for d in report.destinations)
    if changed > PLANNER_STATISTICS_THRESHOLD:
        # Delivery's queries should be planned for the table as it is now.
        refresh_statistics(connection, memberships_only=True)
        connection.commit()
