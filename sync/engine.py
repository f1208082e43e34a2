"""The engine's facade: a ``Syncer`` owns a state database and runs its audiences.

``sync`` runs one audience (lease → compute → guard → plan → deliver → record), ``sweep``
delivers leftovers whose backoff expired, ``retry`` re-queues failed rows, ``retire`` ends an
audience removed from the config (or its presence at a destination it left), and
``retire_orphans`` applies ``on_removed = "retire"``. They share one path
(``sync.run.context``): take the lease, keep the run record, open the destinations, deliver.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType

from sqlalchemy import Connection, Engine

from sync import redaction
from sync.config import ComputationConfig, Config
from sync.delivery import ProgressFactory, prune_deliveries
from sync.errors import (
    AudienceSyncError,
    ConfigDriftError,
    RunInterruptedError,
    SourceError,
    UnknownAudienceError,
    error_line,
)
from sync.reports import DestinationReport, RunOptions, RunReport
from sync.run.compute import AfterChunk, compute_dry_snapshot, compute_snapshot
from sync.run.context import RunContext, RunHooks, Targets
from sync.run.drift import drift_problem
from sync.run.dry_run import DRY_RUN_ID, copy_audience_state, copy_audiences, scratch_state
from sync.run.prepare import commit_plan, end_planning, plan_destinations
from sync.run.record import (
    ABANDONED,
    fill_snapshot,
    record_run_safely,
    status_after_delivery,
)
from sync.run.retire import retire_audience, retire_orphans
from sync.run.sweep import sweep_audience
from sync.state.audiences import ensure_audience, stored_audience
from sync.state.db import installation_id, open_state
from sync.state.leases import Lease, new_owner_id
from sync.state.memberships import DestinationTarget, retry_failed
from sync.state.tables import RunTrigger

logger = logging.getLogger("sync.runner")

__all__ = ["DestinationReport", "RunHooks", "RunOptions", "RunReport", "Syncer"]


def resolve_computations(config: Config, names: list[str]) -> list[ComputationConfig]:
    """Audiences and trait groups by name or key, all of them when ``names`` is empty; a name
    that matches nothing is an ``UnknownAudienceError`` (checked before the state DB opens)."""
    if not names:
        return list(config.computations)
    found = []
    for name in names:
        audience = config.find_audience(name)
        if audience is None:
            known = ", ".join(a.trait_key for a in config.computations) or "none"
            raise UnknownAudienceError(f'no audience named "{name}" (keys: {known})')
        found.append(audience)
    return found


class Syncer:
    """Runs audiences against one state database; thread-safe for different audiences.

    ``with Syncer(config) as syncer:`` opens the state DB (migrating it when the config says
    so) and disposes it at the end. Given an ``engine`` (tests and benchmarks share one), the
    syncer borrows it and leaves it open, so it needs no ``with``."""

    def __init__(
        self,
        config: Config,
        engine: Engine | None = None,
        *,
        owner: str | None = None,
        stop: threading.Event | None = None,
        hooks: RunHooks | None = None,
        create_state: bool = True,
    ) -> None:
        """``create_state = False``: a missing SQLite state DB is an error, never created (for
        commands about what it already holds)."""
        # The state DB's error columns and every log line redact this config's secrets.
        redaction.install(config.redactor())
        self._owns_engine = engine is None
        if engine is None:
            engine = open_state(
                config.state.url, auto_upgrade=config.state.auto_upgrade, create=create_state
            )
        self._context = RunContext(
            config,
            engine,
            owner=owner or new_owner_id(),
            stop=stop or threading.Event(),
            hooks=hooks or RunHooks(),
        )

    @property
    def config(self) -> Config:
        """The configuration this syncer runs."""
        return self._context.config

    @property
    def engine(self) -> Engine:
        """The state database engine."""
        return self._context.engine

    @property
    def stop(self) -> threading.Event:
        """Set to stop: runs end between chunks and batches, recording what they did."""
        return self._context.stop

    @property
    def lease_seconds(self) -> float:
        """How long this syncer's leases live (``[daemon] lease_seconds``)."""
        return self._context.lease_seconds

    @lease_seconds.setter
    def lease_seconds(self, seconds: float) -> None:
        # Tests shorten it below the configurable minimum.
        self._context.lease_seconds = seconds

    def close(self) -> None:
        """Dispose the state DB engine, unless it was borrowed."""
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Syncer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def resolve(self, names: list[str]) -> list[ComputationConfig]:
        """Audiences by name or key; all of them when ``names`` is empty."""
        return resolve_computations(self.config, names)

    def open_destinations(self, names: Iterable[str]) -> AbstractContextManager[Targets]:
        """The configured destinations ``names``, each beside the planner's view of it;
        closed when the ``with`` block ends."""
        return self._context.open_destinations(names)

    # --- sync: one run -------------------------------------------------------------------------

    def sync(
        self,
        audience: ComputationConfig,
        options: RunOptions | None = None,
        *,
        progress: ProgressFactory | None = None,
    ) -> RunReport:
        """Run one audience now (``LeaseHeldError`` when another process runs it)."""
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
        lease = self._context.take_lease(audience_id, audience.title, options.wait)
        trigger: RunTrigger = (
            "full" if options.full and options.trigger == "manual" else options.trigger
        )
        with self._context.recorded_run(audience, audience_id, trigger, report, lease, started):
            self._run(audience, audience_id, install, options, report, lease, progress)
        self.prune_ledger()
        return report

    def prune_ledger(self) -> int:
        """Delete delivery ledger rows older than ``[state] keep_deliveries`` (after every run,
        so both `sync` and the daemon prune); a failure is logged, never the run's."""
        try:
            return prune_deliveries(self.engine, self.config.state.keep_deliveries)
        except Exception as exc:
            logger.warning("could not prune the delivery ledger: %s", error_line(exc))
            return 0

    def _refuse_drift(self, audience: ComputationConfig, *, full: bool) -> None:
        """Raise ``ConfigDriftError`` for a likely rename or a moved endpoint (sync.run.drift)."""
        with self.engine.connect() as connection:
            problem = drift_problem(connection, self.config, audience, full=full)
            connection.rollback()
        if problem:
            raise ConfigDriftError(problem)

    def _after_chunk(self, lease: Lease | None) -> AfterChunk:
        """Between chunks of the source query: the hook, then stop when asked to or when
        the lease is lost (the heartbeat renews it)."""

        def after_chunk() -> None:
            if self._context.hooks.after_chunk is not None:
                self._context.hooks.after_chunk()
            if self.stop.is_set():
                what = "the dry run" if lease is None else "the snapshot"
                raise RunInterruptedError(f"stopped while computing {what}; nothing changed")
            if lease is not None:
                lease.ensure_held()

        return after_chunk

    def _run(
        self,
        audience: ComputationConfig,
        audience_id: int,
        install: str,
        options: RunOptions,
        report: RunReport,
        lease: Lease,
        progress: ProgressFactory | None,
    ) -> None:
        """The run's steps inside its error boundary, then its record."""
        timings: dict[str, float] = {}
        with self.open_destinations(audience.destinations) as targets:
            try:
                with self.engine.connect() as connection:
                    if not self._prepare(
                        connection,
                        audience,
                        audience_id,
                        [t for t, _ in targets],
                        options,
                        report,
                        lease,
                        timings,
                    ):
                        return  # guarded: recorded with the rolled-back plan
                if not options.deliver:
                    report.status, report.error = "partial", "delivery skipped (plan only)"
                else:
                    t2 = time.monotonic()
                    error = self._context.deliver(
                        audience_id,
                        audience.trait_key,
                        install,
                        targets,
                        report.destinations,
                        lease,
                        progress,
                        kind=audience.kind,
                    )
                    report.error = error or report.error
                    timings["deliver_seconds"] = time.monotonic() - t2
                    report.status = status_after_delivery(report, stopped=self.stop.is_set())
            except RunInterruptedError as exc:  # asked to stop while computing: nothing changed
                report.status, report.error = "interrupted", error_line(exc)
            except AudienceSyncError as exc:  # SourceError, LeaseLostError…
                report.status, report.error = "failed", error_line(exc)
            except Exception as exc:
                # This audience's error boundary: the state DB gone or locked, a full disk, a
                # bug fail this run alone, recorded in one line; the caller runs the next one.
                report.status, report.error = "failed", error_line(exc)
                logger.error("%s", report.error, exc_info=logger.isEnabledFor(logging.DEBUG))
            except KeyboardInterrupt:
                # A second Ctrl-C (the first sets `stop`): delivery abandoned its batches in
                # flight; their rows stay covered by delivery_progress for the next run.
                report.status, report.error = "interrupted", ABANDONED
                record_run_safely(self.engine, report, timings, lease)
                raise
            except BaseException as exc:  # SystemExit: record, then stop
                report.status, report.error = "failed", error_line(exc)
                record_run_safely(self.engine, report, timings, lease)
                raise
        record_run_safely(self.engine, report, timings, lease)

    def _prepare(
        self,
        connection: Connection,
        audience: ComputationConfig,
        audience_id: int,
        targets: list[DestinationTarget],
        options: RunOptions,
        report: RunReport,
        lease: Lease,
        timings: dict[str, float],
    ) -> bool:
        """Compute, plan and commit the plan; False when the guard refused it (the run is
        then recorded ``guarded``)."""
        assert report.run_id is not None
        t0 = time.monotonic()
        after_chunk = self._after_chunk(lease)
        stats = compute_snapshot(
            connection, self.config, audience, audience_id, report.run_id, lease, after_chunk
        )
        timings["compute_seconds"] = time.monotonic() - t0
        fill_snapshot(report, stats)
        t1 = time.monotonic()
        problem, plans = plan_destinations(
            connection,
            self.config,
            audience,
            audience_id,
            report.run_id,
            targets,
            stats,
            options,
            self._context.hooks.after_plan,
        )
        end_planning(connection, audience_id, guarded=bool(problem))
        timings["plan_seconds"] = time.monotonic() - t1
        report.destinations = plans
        if problem:
            report.status, report.error = "guarded", problem
        commit_plan(connection, report, timings, lease)
        return not problem

    def _dry_run(self, audience: ComputationConfig, options: RunOptions, report: RunReport) -> None:
        """Stage and plan into a private scratch copy of the audience's state, report, and
        throw the copy away: the state DB is only read (after the source query), never written
        nor locked (sync.run.dry_run)."""
        with self.open_destinations(audience.destinations) as opened:
            targets = [t for t, _ in opened]
        with scratch_state() as scratch:
            copy_audiences(self.engine, scratch)
            audience_id = ensure_audience(scratch, audience)
            try:
                after_chunk = self._after_chunk(None)
                with self.engine.connect() as state:
                    stats = compute_dry_snapshot(scratch, state, self.config, audience, after_chunk)
            except SourceError as exc:
                report.status, report.error = "failed", str(exc)
                return
            fill_snapshot(report, stats)
            names = [t.name for t in targets]
            copy_audience_state(self.engine, scratch, audience.trait_key, audience_id, names)
            problem, plans = plan_destinations(
                scratch,
                self.config,
                audience,
                audience_id,
                DRY_RUN_ID,
                targets,
                stats,
                options,
                self._context.hooks.after_plan,
            )
            report.status = "guarded" if problem else "planned"
            report.error = problem
            report.destinations = plans

    # --- sweep, retry, retire ------------------------------------------------------------------

    def sweep(self, audience: ComputationConfig) -> RunReport | None:
        """Deliver transient leftovers whose backoff expired (the daemon's sweep); None when
        there is nothing due or another process holds the audience."""
        return sweep_audience(self._context, audience)

    def retry(self, name: str) -> int:
        """Re-queue the ``failed`` rows of the audience ``name`` (a configured name or key, or
        a stored key) for its next run; return how many."""
        with self.engine.begin() as connection:
            return retry_failed(connection, stored_audience(connection, self.config, name))

    def retire(
        self,
        name: str,
        *,
        destination: str | None = None,
        send_false: bool = False,
        send_null: bool = False,
        wait: float = 0.0,
    ) -> list[DestinationReport]:
        """Retire the audience ``name`` (its key) that left the config: its key stays reserved.
        With ``destination``, end instead the presence of audience ``name`` (it may stay
        configured) at a destination it no longer lists: its rows there are deleted, so that
        `status` and the drift warning no longer count them. Either way, with ``send_false``,
        first send ``false`` to its members there (``AudienceSyncError`` unless every one was
        delivered); ``send_null`` does the same for a trait group, with its traits null."""
        return retire_audience(
            self._context,
            name,
            destination=destination,
            send_false=send_false,
            send_null=send_null,
            wait=wait,
        )

    def retire_orphans(
        self, *, force: bool, time_budget: float | None = None, start_after: str | None = None
    ) -> list[RunReport]:
        """``on_removed = "retire"``: send ``false`` to the members of every audience removed
        from the config and retire it, one report each; the removal guard applies as to any
        run (``force`` passes it). ``time_budget`` caps each one's delivery, and none starts
        after it (the daemon's start-up and sweep retires, at most twice it: the rest is left
        to the next sweep, which starts after ``start_after``, the last key tried)."""
        return retire_orphans(
            self._context, force=force, time_budget=time_budget, start_after=start_after
        )
