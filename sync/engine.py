"""A run: lease → compute → guard → plan → deliver → record, for one audience."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, insert, select, update

from sync import redaction
from sync.clock import state_now
from sync.config import AudienceConfig, Config
from sync.delivery import ProgressFactory, deliver_destinations
from sync.delivery.deliverer import RetryPolicy, recover_in_flight, retry_due
from sync.destinations import Destination, build_destination
from sync.errors import (
    AudienceSyncError,
    ConfigDriftError,
    LeaseHeldError,
    LeaseLostError,
    RunInterruptedError,
    SourceError,
    UnknownAudienceError,
    error_line,
)
from sync.logs import current_run
from sync.reports import DestinationReport, RunOptions, RunReport
from sync.run.drift import drift_problem, record_endpoints
from sync.run.dry_run import DRY_RUN_ID, copy_audience_state, copy_audiences, scratch_state
from sync.run.plan import (
    DestinationPlan,
    drop_staging,
    mark_full_resync,
    plan_destination,
    removal_problem,
)
from sync.run.same_database import stage_in_database
from sync.run.sources import make_source_engine
from sync.run.staging import SnapshotStats, refresh_statistics, stage_from_source
from sync.state.audiences import ensure_audience
from sync.state.db import installation_id
from sync.state.leases import Lease, new_owner_id
from sync.state.memberships import DestinationTarget, count_status
from sync.state.tables import AUDIENCES as A
from sync.state.tables import RUN_DELIVERIES, RUNS, RunStatus, RunTrigger

logger = logging.getLogger("sync.runner")

__all__ = ["DestinationReport", "RunOptions", "RunReport", "Syncer"]

# Above this many changed rows, PostgreSQL's statistics are refreshed before delivery (a first
# sync grows memberships from nothing; plans made for an empty table scan it per batch).
PLANNER_STATISTICS_THRESHOLD = 10_000


class Syncer:
    """Runs audiences against one state database. Thread-safe for different audiences."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        owner: str | None = None,
        stop: threading.Event | None = None,
        progress: ProgressFactory | None = None,
        on_lease: Callable[[Lease], None] | None = None,
    ) -> None:
        """``on_lease`` is called with each lease this syncer takes: a seam for fault drills
        and tests (e.g. stalling a run's heartbeat)."""
        self.config = config
        self.engine = engine
        # The state DB's error columns and every log line redact this config's secrets.
        redaction.install(config.redactor())
        self.owner = owner or new_owner_id()
        self.stop = stop or threading.Event()
        self.progress = progress
        self.on_lease = on_lease
        self.lease_seconds = config.daemon.lease_seconds
        defaults = config.defaults
        self.policy = RetryPolicy(
            initial_delay=defaults.retry_initial_delay,
            max_delay=defaults.retry_max_delay,
            time_budget=defaults.delivery_time_budget,
            max_attempts=defaults.max_attempts,
        )

    def resolve(self, names: list[str]) -> list[AudienceConfig]:
        """Audiences by name or key; all of them when ``names`` is empty."""
        if not names:
            return list(self.config.audiences)
        found = []
        for name in names:
            audience = self.config.find_audience(name)
            if audience is None:
                known = ", ".join(a.trait_key for a in self.config.audiences) or "none"
                raise UnknownAudienceError(f'no audience named "{name}" (keys: {known})')
            found.append(audience)
        return found

    # --- one run ---------------------------------------------------------------------------

    def sync(self, audience: AudienceConfig, options: RunOptions | None = None) -> RunReport:
        """Run one audience now."""
        options = options or RunOptions()
        started = time.monotonic()
        report = RunReport(audience.name, audience.trait_key, "running", dry_run=options.dry_run)
        self._refuse_drift(audience, full=options.full)
        if options.dry_run:
            self._dry_run(audience, options, report)
            report.seconds = time.monotonic() - started
            return report
        with self.engine.begin() as connection:
            audience_id = ensure_audience(connection, audience)
            install = installation_id(connection)
        lease = self._take_lease(audience, audience_id, options.wait)
        with self._running(audience, audience_id, lease, options, report, started):
            self._run(audience, audience_id, install, options, report, lease)
        return report

    def _refuse_drift(self, audience: AudienceConfig, *, full: bool) -> None:
        """Raise ``ConfigDriftError`` for a likely rename or a moved endpoint (sync.run.drift)."""
        with self.engine.connect() as connection:
            problem = drift_problem(connection, self.config, audience, full=full)
            connection.rollback()
        if problem:
            raise ConfigDriftError(problem)

    def _take_lease(self, audience: AudienceConfig, audience_id: int, wait: float) -> Lease:
        lease = Lease(self.engine, audience_id, audience.name, self.owner, self.lease_seconds)
        abandoned = lease.acquire(wait)
        if self.on_lease is not None:
            self.on_lease(lease)
        if abandoned:
            logger.warning(
                'audience "%s": marked %d run(s) abandoned (their process crashed or lost its '
            "lease)",
                audience.name,
                abandoned,
            )
        return lease

    @contextmanager
    def _running(
        self,
        audience: AudienceConfig,
        audience_id: int,
        lease: Lease,
        options: RunOptions,
        report: RunReport,
        started: float,
    ) -> Iterator[None]:
        """Record a run row and tag log lines with it; afterwards release the lease and log
        the run's one summary line."""
        token = None
        try:
            with self.engine.begin() as connection:
                lease.fence(connection)
                report.run_id = self._start_run(connection, audience_id, options)
            token = current_run.set(f"{report.run_id} {audience.trait_key}")
            yield
        finally:
            lease.release()
            report.seconds = time.monotonic() - started
            self._log_summary(report)
            if token is not None:
                current_run.reset(token)

    def sweep(self, audience: AudienceConfig) -> RunReport | None:
        """Deliver transient leftovers whose backoff expired (the daemon's sweep); None when
        there is nothing due or another process holds the audience."""
        with self.engine.begin() as connection:
            audience_id = connection.execute(
                select(A.c.id).where(A.c.key == audience.trait_key, A.c.retired_at.is_(None))
            ).scalar()
            if audience_id is None or not retry_due(connection, audience_id):
                return None
            if drift_problem(connection, self.config, audience, full=False):
                return None  # its scheduled run reports it
            install = installation_id(connection)
        try:
            lease = self._take_lease(audience, audience_id, 0.0)
        except LeaseHeldError:
            return None
        started = time.monotonic()
        report = RunReport(audience.name, audience.trait_key, "running")
        options = RunOptions(trigger="sweep")
        with self._running(audience, audience_id, lease, options, report, started):
            pairs = self._targets(audience)
            with self.engine.connect() as connection:
                for target, _ in pairs:
                    counts = count_status(connection, audience_id, target.name)
                    pending = counts.get("pending", 0) + counts.get("rejected", 0)
                    report.destinations.append(DestinationReport(target.name, pending=pending))
            try:
                self._deliver(audience, audience_id, install, pairs, report, lease)
                report.status = self._status_after_delivery(report)
            except AudienceSyncError as exc:
                report.status, report.error = "failed", str(exc)
            finally:
                for _, destination in pairs:
                    destination.close()
            self._finish_safely(report, {"deliver_seconds": time.monotonic() - started}, lease)
        return report

    def _start_run(self, connection: Connection, audience_id: int, options: RunOptions) -> int:
        trigger: RunTrigger = (
            "full" if options.full and options.trigger == "manual" else options.trigger
        )
        result = connection.execute(
            insert(RUNS).values(
                audience_id=audience_id,
                trigger=trigger,
                status="running",
                owner=self.owner,
                started_at=state_now(connection),
                members=0,
                added=0,
                removed=0,
                sent=0,
                rejected=0,
                invalid=0,
                duplicates=0,
                skipped=0,
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    def _targets(self, audience: AudienceConfig) -> list[tuple[DestinationTarget, Destination]]:
        pairs = []
        for name in audience.destinations:
            destination = build_destination(name, self.config.destinations[name])
            pairs.append((DestinationTarget(name, destination.requires_user_id), destination))
        return pairs

    def _compute(
        self,
        connection: Connection,
        audience: AudienceConfig,
        run_id: int,
        commit: bool,
        lease: Lease | None = None,
    ) -> SnapshotStats:
        source = self.config.sources[audience.source]
        if source.url == self.config.state.url:
            stats = stage_in_database(
                connection,
                run_id,
                audience=audience.name,
                source_name=audience.source,
                query=audience.query,
                traits=audience.traits,
            )
            if stats is not None:
                return stats  # else values SQL cannot render as Python does: stream them
        engine = self._source_engine(audience)
        try:
            return stage_from_source(
                engine,
                connection,
                run_id,
                audience=audience.name,
                source_name=audience.source,
                query=audience.query,
                traits=audience.traits,
                chunk_size=source.chunk_size,
                commit_each_chunk=commit,
                after_chunk=lambda: self._between_chunks(lease),
            )
        finally:
            engine.dispose()

    def _source_engine(self, audience: AudienceConfig) -> Engine:
        source = self.config.sources[audience.source]
        if source.demo:
            from sync.demo import ensure_demo_warehouse

            ensure_demo_warehouse(source.url)
        return make_source_engine(audience.source, source.url)

    def _between_chunks(self, lease: Lease | None) -> None:
        if self.stop.is_set():
            raise RunInterruptedError("stopped while computing the snapshot; nothing changed")
        if lease is not None:
            lease.ensure_held()  # the heartbeat renews it; a lost lease stops the compute

    def _plan(
        self,
        connection: Connection,
        audience: AudienceConfig,
        audience_id: int,
        run_id: int,
        targets: list[DestinationTarget],
        stats: SnapshotStats,
        options: RunOptions,
    ) -> tuple[str | None, list[DestinationPlan]]:
        # Before the plan: a leaver's status depends on whether its row is in doubt.
        recover_in_flight(connection, audience_id)
        now = state_now(connection)  # changed_at: one clock for every host
        plans = []
        for target in targets:
            plan = plan_destination(connection, audience_id, run_id, target, now)
            problem = removal_problem(
                plan,
                stats.staged,
                max_removal_ratio=self.config.max_removal_ratio_of(audience),
                min_members=self.config.guard_min_members_of(audience),
                audience_name=audience.name,
            )
            if problem and not options.force:
                return problem, []  # the caller rolls the plan back
            if options.full:
                mark_full_resync(
                    connection, audience_id, target, now, include_exited=options.include_exited
                )
            counts = count_status(connection, audience_id, target.name)
            plan.pending = counts.get("pending", 0) + counts.get("rejected", 0)
            plan.skipped = counts.get("skipped", 0)
            plans.append(plan)
        if not options.dry_run:  # a dry run writes nothing another run could wait for
            record_endpoints(connection, self.config, audience_id, [t.name for t in targets], now)
        return None, plans

    def _dry_run(self, audience: AudienceConfig, options: RunOptions, report: RunReport) -> None:
        """Stage and plan into a private scratch copy of the audience's state, report, and
        throw the copy away: the state DB is only read (after the source query), never written
        nor locked (sync/dry_run.py)."""
        targets = [t for t, d in self._targets(audience)]
        with scratch_state() as scratch:
            copy_audiences(self.engine, scratch)
            audience_id = ensure_audience(scratch, audience)
            try:
                stats = self._stage_dry(scratch, audience, options)
            except SourceError as exc:
                report.status, report.error = "failed", str(exc)
                return
            self._fill_snapshot(report, stats)
            names = [t.name for t in targets]
            copy_audience_state(self.engine, scratch, audience.trait_key, audience_id, names)
            problem, plans = self._plan(
                scratch, audience, audience_id, DRY_RUN_ID, targets, stats, options
            )
            report.status = "guarded" if problem else "planned"
            report.error = problem
            report.destinations = _reports_of(plans)

    def _stage_dry(
        self, scratch: Connection, audience: AudienceConfig, options: RunOptions
    ) -> SnapshotStats:
        """A dry run always streams (the same-database path would write the state DB); both
        paths stage the same rows."""

        def after_chunk() -> None:
            if self.stop.is_set():
                raise RunInterruptedError("stopped while computing the dry run; nothing changed")
            if options.after_chunk is not None:
                options.after_chunk()

        engine = self._source_engine(audience)
        try:
            return stage_from_source(
                engine,
                scratch,
                DRY_RUN_ID,
                audience=audience.name,
                source_name=audience.source,
                query=audience.query,
                traits=audience.traits,
                chunk_size=self.config.sources[audience.source].chunk_size,
                commit_each_chunk=False,
                after_chunk=after_chunk,
            )
        finally:
            engine.dispose()

    @staticmethod
    def _fill_snapshot(report: RunReport, stats: SnapshotStats) -> None:
        report.members = stats.staged
        report.invalid = stats.invalid
        report.duplicates = stats.duplicates
        report.invalid_samples = list(stats.samples)

    def _run(
        self,
        audience: AudienceConfig,
        audience_id: int,
        install: str,
        options: RunOptions,
        report: RunReport,
        lease: Lease,
    ) -> None:
        assert report.run_id is not None
        run_id = report.run_id
        timings: dict[str, float] = {}
        pairs = self._targets(audience)
        try:
            t0 = time.monotonic()
            with self.engine.connect() as connection:
                drop_staging(connection, audience_id)
                _fenced_commit(connection, lease)
                try:
                    stats = self._compute(connection, audience, run_id, commit=True, lease=lease)
                    _fenced_commit(connection, lease)
                    refresh_statistics(connection)
                    connection.commit()
                except (SourceError, RunInterruptedError):
                    connection.rollback()
                    drop_staging(connection, audience_id)
                    _fenced_commit(connection, lease)
                    raise
                timings["compute_seconds"] = time.monotonic() - t0
                self._fill_snapshot(report, stats)
                t1 = time.monotonic()
                problem, plans = self._plan(
                    connection,
                    audience,
                    audience_id,
                    run_id,
                    [t for t, _ in pairs],
                    stats,
                    options,
                )
                if problem:
                    connection.rollback()
                drop_staging(connection, audience_id, holds_write_lock=not problem)
                timings["plan_seconds"] = time.monotonic() - t1
                report.destinations = _reports_of(plans)
                if problem:
                    report.status, report.error = "guarded", problem
                    self._finish(connection, report, timings, lease)
                    connection.commit()
                    return
                # The plan and the run's planned counts commit together, before any send.
                self._finish(connection, report, timings, lease, status="running")
                connection.commit()
                changed = sum(d.added + d.removed for d in report.destinations)
                if changed > PLANNER_STATISTICS_THRESHOLD:
                    # Delivery's queries should be planned for the table as it is now.
                    refresh_statistics(connection, memberships_only=True)
                    connection.commit()
            if not options.deliver:
                report.status, report.error = "partial", "delivery skipped (plan only)"
            else:
                t2 = time.monotonic()
                self._deliver(audience, audience_id, install, pairs, report, lease)
                timings["deliver_seconds"] = time.monotonic() - t2
                report.status = self._status_after_delivery(report)
        except AudienceSyncError as exc:  # SourceError, LeaseLostError, RunInterruptedError, ...
            report.status, report.error = "failed", error_line(exc)
        except Exception as exc:
            # This audience's error boundary: the state DB gone or locked, a full disk, a bug
            # fail this run alone, recorded in one line; the caller runs the next audience.
            report.status, report.error = "failed", error_line(exc)
            logger.error("%s", report.error, exc_info=logger.isEnabledFor(logging.DEBUG))
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: record, then stop
            report.status, report.error = "failed", error_line(exc)
            self._finish_safely(report, timings, lease)
            raise
        finally:
            for _, destination in pairs:
                destination.close()
        self._finish_safely(report, timings, lease)

    def _deliver(
        self,
        audience: AudienceConfig,
        audience_id: int,
        install: str,
        pairs: list[tuple[DestinationTarget, Destination]],
        report: RunReport,
        lease: Lease,
    ) -> None:
        report.error = (
            deliver_destinations(
                self.engine,
                self.config,
                self.policy,
                audience_id=audience_id,
                key=audience.trait_key,
                install=install,
                pairs=pairs,
                entries=report.destinations,
                lease=lease,
                stop=self.stop,
                progress=self.progress,
            )
            or report.error
        )

    @staticmethod
    def _status_after_delivery(report: RunReport) -> RunStatus:
        if report.error:
            return "failed"
        if any(d.left_pending or d.rejected or d.failed for d in report.destinations):
            return "partial"
        return "succeeded"

    def _finish(
        self,
        connection: Connection,
        report: RunReport,
        timings: dict[str, float],
        lease: Lease,
        status: str | None = None,
    ) -> None:
        """Record the run's counts (and, unless ``status`` says it goes on, its outcome);
        fenced first, so that a run that lost its lease leaves the record to its successor."""
        assert report.run_id is not None
        # Before touching `runs`: a takeover locks the lease row, then marks `runs`; taking the
        # locks in the same order cannot deadlock.
        lease.fence(connection)
        final = status is None
        connection.execute(
            update(RUNS)
            .where(RUNS.c.id == report.run_id, RUNS.c.status == "running")
            .values(
                status=status or report.status,
                finished_at=state_now(connection) if final else None,
                members=report.members,
                added=sum(d.added for d in report.destinations),
                removed=sum(d.removed for d in report.destinations),
                sent=sum(d.sent for d in report.destinations),
                rejected=sum(d.rejected for d in report.destinations),
                invalid=report.invalid,
                duplicates=report.duplicates,
                skipped=sum(d.skipped for d in report.destinations),
                error=report.error,
                invalid_samples=report.invalid_samples or None,
                **timings,
            )
        )
        if final:
            table = RUN_DELIVERIES
            connection.execute(table.delete().where(table.c.run_id == report.run_id))
            if report.destinations:
                connection.execute(
                    table.insert(),
                    [{"run_id": report.run_id, **d.stored()} for d in report.destinations],
                )

    def _finish_safely(self, report: RunReport, timings: dict[str, float], lease: Lease) -> None:
        """Record the run in its own transaction. A run that lost its lease records nothing
        and reports itself ``abandoned``, as its successor recorded it. When the state DB
        refuses (down, locked, full) the report says so and the run's row stays `running`
        until its lease expires and the next run marks it `abandoned`."""
        try:
            with self.engine.begin() as connection:
                self._finish(connection, report, timings, lease)
        except LeaseLostError as exc:
            report.status = "abandoned"
            report.error = str(exc)
        except Exception as exc:
            problem = f"the run could not be recorded: {error_line(exc)}"
            logger.error("%s", problem)
            report.status = "failed"
            report.error = f"{report.error}; {problem}" if report.error else problem

    def _log_summary(self, report: RunReport) -> None:
        parts = ", ".join(
            f"{d.destination}: +{d.added} -{d.removed} sent {d.sent}"
            + (f" rejected {d.rejected}" if d.rejected else "")
            + (f" trimmed {d.trimmed}" if d.trimmed else "")
            + (f" left {d.left_pending}" if d.left_pending else "")
            for d in report.destinations
        )
        level = logging.INFO if report.ok else logging.ERROR
        logger.log(
            level,
            'run %s audience "%s": %s, %d members, %d invalid (%s) in %.1fs%s',
            report.run_id,
            report.key,
            report.status,
            report.members,
            report.invalid,
            parts or "no destinations planned",
            report.seconds,
            f": {report.error}" if report.error else "",
        )


def _reports_of(plans: list[DestinationPlan]) -> list[DestinationReport]:
    """A report entry per destination, filled with what planning decided."""
    return [
        DestinationReport(
            p.destination, added=p.added, removed=p.removed, pending=p.pending, skipped=p.skipped
        )
        for p in plans
    ]


def _fenced_commit(connection: Connection, lease: Lease) -> None:
    """Commit a step of the run only while its lease is still its own."""
    try:
        lease.fence(connection)
    except LeaseLostError:
        connection.rollback()
        raise
    connection.commit()
