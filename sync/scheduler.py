"""The daemon: every enabled audience on its schedule, a retry sweep, a heartbeat row, metrics
and a status page (sync.monitor), and a graceful stop."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from sync.config import ComputationConfig, Config
from sync.config.listen import parse_listen_address
from sync.engine import Syncer
from sync.errors import AudienceSyncError, LeaseHeldError, error_line
from sync.monitor import Heartbeat, Metrics, MonitorServer, Readiness
from sync.reports import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    PARTIAL_STATUSES,
    RunOptions,
    RunReport,
)
from sync.run.drift import warn_about_drift
from sync.state.leases import new_owner_id

logger = logging.getLogger("sync.daemon")


def schedule_trigger(config: Config, audience: ComputationConfig) -> Any:
    """The APScheduler trigger of ``audience``'s schedule: an interval, or a cron expression
    read as wall-clock time in ``[defaults] timezone`` (daylight saving included, as cron
    does)."""
    schedule = config.schedule_of(audience)
    jitter = int(config.daemon.jitter) or None
    if schedule.interval_seconds is not None:
        return IntervalTrigger(seconds=schedule.interval_seconds, timezone=UTC, jitter=jitter)
    zone = ZoneInfo(config.defaults.timezone)
    return WallClockCronTrigger.from_crontab(schedule.cron, timezone=zone)


# How long the daemon's start-up retire of removed computations may deliver to each (their
# false or nulls go before the first runs; a destination that is down would otherwise hold
# every run back for the whole delivery budget).
STARTUP_RETIRE_SECONDS = 30.0
# Each sweep's retire of removed computations gets the same budget, or a quarter of
# sweep_interval when that is shorter: it delivers to each for that long at most and starts
# none after it, so it ends within about half the interval and the sweep's other work (every
# audience's leftovers, pruning) runs at every sweep, where a destination that is down held
# the sweep for the whole delivery budget and APScheduler skipped the sweeps meanwhile. What
# is left stays pending for the next sweep.
SWEEP_RETIRE_SECONDS = 30.0


def _failure_kind(reason: str) -> str | None:
    """What an orphan's failure is, for logging it once per kind: its HTTP status or error
    class where it names one (an error body carrying a request id, a count that drops as the
    orphan drains, do not make another), else its text without numbers. None when nothing
    was tried (its rows wait for their retry time): nothing new to say."""
    if re.search(r"are not delivered yet; ", reason):
        return None
    found = re.search(r"\bHTTP [0-9]{3}\b|\b[A-Za-z]+(?:Error|Timeout|Exception)\b", reason)
    return found.group(0) if found else re.sub(r"[0-9]+", "#", reason)


class WallClockCronTrigger(CronTrigger):  # type: ignore[misc]
    """A cron trigger that, like cron, runs a job at a fixed hour once when the clock falls
    back: 01:30 happens twice in New York on the first Sunday of November, and APScheduler's
    trigger fired at both. A job whose hour field is a wildcard still runs every real hour."""

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> Any:
        fire = super().get_next_fire_time(previous_fire_time, now)
        if fire is None or not self._repeated_wall_time(fire) or self._every_hour():
            return fire
        # Skip the repeated wall-clock times: look again from the first minute after them,
        # stepping in UTC (APScheduler steps in wall-clock time, which lands back in the
        # first pass and finds the repeat again).
        after = fire.astimezone(UTC)
        for _ in range(24 * 60):
            after += timedelta(minutes=1)
            if not self._repeated_wall_time(after.astimezone(fire.tzinfo)):
                break
        return super().get_next_fire_time(None, after)

    @staticmethod
    def _repeated_wall_time(moment: datetime) -> bool:
        """Whether ``moment`` is the second time its zone's clocks showed its wall time."""
        return moment.fold == 1 and moment.replace(fold=0).utcoffset() != moment.utcoffset()

    def _every_hour(self) -> bool:
        hour = next(field for field in self.fields if field.name == "hour")
        return str(hour).startswith("*")


class Daemon:
    """Runs audiences on their schedules until asked to stop.

    Like a ``Syncer`` (it runs one), ``with Daemon(config) as daemon:`` opens the state DB and
    disposes it at the end; given an ``engine``, the daemon borrows it."""

    def __init__(
        self,
        config: Config,
        engine: Engine | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.syncer = Syncer(config, engine, stop=self.stop)
        self.engine = self.syncer.engine
        self._active = 0
        self._idle = threading.Condition()
        self.failures = 0
        # How long the start-up retire, and each sweep's, may deliver to each removed
        # computation.
        self.startup_retire_seconds = STARTUP_RETIRE_SECONDS
        self.sweep_retire_seconds = min(SWEEP_RETIRE_SECONDS, config.daemon.sweep_interval / 4)
        self.once_reports: list[RunReport] = []  # what `run --once` ran, for its --json
        self.partial = 0  # runs that left changes unacknowledged (`run --once` exits 3)
        self.busy = 0  # runs skipped because another process held the audience
        # The reason last logged for each removed computation not retired (guarded, failed):
        # logged when it changes, not on every sweep; forgotten once it is retired.
        self._orphan_reasons: dict[str, str] = {}
        self._orphan_cursor: str | None = None  # the last orphan a retire tried
        # Its row in `daemons` (sync.state.daemons) and what /metrics shows (sync.monitor).
        self.daemon_id = new_owner_id()
        self.metrics = Metrics()
        self.monitor: MonitorServer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._heartbeat: Heartbeat | None = None

    def close(self) -> None:
        """Dispose the state DB engine, unless it was borrowed."""
        self.syncer.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def audiences(self) -> list[ComputationConfig]:
        """The audiences the daemon schedules (enabled ones)."""
        return [a for a in self.config.computations if a.enabled]

    # --- jobs ------------------------------------------------------------------------------

    def _tracked(self, work: Callable[[], RunReport | None]) -> RunReport | None:
        if self.stop.is_set():
            return None
        with self._idle:
            self._active += 1
        try:
            report = work()
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
        if report is not None:
            self.metrics.observe(report)
            if self._heartbeat is not None:
                self._heartbeat.wake()  # its next run time and the gauges changed
        return report

    def run_audience(self, audience: ComputationConfig) -> RunReport | None:
        """One scheduled run; a busy audience is skipped, every failure is logged."""

        def work() -> RunReport | None:
            try:
                report = self.syncer.sync(audience, RunOptions(trigger="schedule"))
            except LeaseHeldError as exc:
                logger.info("skipped: %s", exc)
                self.busy += 1
                return None
            except Exception as exc:
                # One line (no SQL, no parameters); the traceback only when debugging.
                logger.error(
                    'audience "%s": %s',
                    audience.trait_key,
                    error_line(exc),
                    exc_info=not isinstance(exc, AudienceSyncError)
                    and logger.isEnabledFor(logging.DEBUG),
                )
                self.failures += 1
                self.metrics.observe_error(audience.trait_key)
                return None
            if not report.ok:
                self.failures += 1
            elif report.status in PARTIAL_STATUSES:
                self.partial += 1
            return report

        return self._tracked(work)

    def warn_about_drift(self) -> None:
        """Log, once, what the config dropped but the state DB still delivers (sync.run.drift)."""
        retire = self.config.defaults.on_removed == "retire"
        try:
            warn_about_drift(self.engine, self.config, warn_orphans=not retire)
        except Exception:
            logger.exception("could not check the config against the state database")

    def retire_removed(self, time_budget: float | None = None) -> None:
        """``on_removed = "retire"``: send false to audiences removed from the config and retire
        them, within the removal guard (one guarded or failed is logged once per reason and
        left for the next sweep); ``time_budget`` caps each one's delivery, and none starts
        after it."""
        if self.config.defaults.on_removed != "retire" or self.stop.is_set():
            return
        reports = self.syncer.retire_orphans(
            force=False, time_budget=time_budget, start_after=self._orphan_cursor
        )
        # The next retire starts after the last one tried: in turn, not always the first.
        self._orphan_cursor = reports[-1].key if reports else None
        for report in reports:
            label, what = (
                ("audience", "false") if report.kind == "audience" else ("trait group", "nulls")
            )
            if report.status == "retired":
                self._orphan_reasons.pop(report.key, None)
                sent = sum(d.sent for d in report.destinations)
                logger.warning(
                    '%s "%s" removed from the config: retired after sending %s to %d '
                    'member(s) (on_removed = "retire")',
                    label,
                    report.key,
                    what,
                    sent,
                )
            elif report.status != "busy":
                reason = report.error or report.status
                kind = _failure_kind(reason)
                if kind is not None and self._orphan_reasons.get(report.key) != kind:
                    self._orphan_reasons[report.key] = kind
                    logger.error("%s", reason)  # it names the computation
                    self.failures += 1

    def sweep(self) -> None:
        """Retry transient leftovers of every audience whose backoff has expired, and apply
        ``on_removed``; prune the delivery ledger."""
        self.syncer.prune_ledger()
        self._tracked(lambda: self._retire_removed_safely(time_budget=self.sweep_retire_seconds))
        for audience in self.audiences:
            if self.stop.is_set():
                return

            def work(audience: ComputationConfig = audience) -> RunReport | None:
                try:
                    return self.syncer.sweep(audience)
                except Exception as exc:
                    logger.error(
                        'audience "%s": sweep failed: %s',
                        audience.trait_key,
                        error_line(exc),
                        exc_info=logger.isEnabledFor(logging.DEBUG),
                    )
                    return None

            self._tracked(work)

    def _retire_removed_safely(self, time_budget: float | None = None) -> None:
        try:
            self.retire_removed(time_budget)
        except Exception:
            logger.exception("retiring audiences removed from the config failed")
            self.failures += 1

    # --- lifecycle -------------------------------------------------------------------------

    def run_once(self) -> int:
        """Run every enabled audience once; the exit code of ``sync`` (README "Exit codes"):
        1 when any run failed, was guarded or busy, else 3 when any was partial, else 0."""
        self.warn_about_drift()
        # Orphans first: their false or nulls go before a computation takes over their names.
        self._retire_removed_safely()
        for audience in self.audiences:
            if self.stop.is_set():
                self.partial += 1  # interrupted before every audience ran
                break
            report = self.run_audience(audience)
            if report is not None:
                self.once_reports.append(report)
        if self.failures or self.busy:
            return EXIT_FAILED
        return EXIT_PARTIAL if self.partial else EXIT_OK

    def _trigger(self, audience: ComputationConfig) -> Any:
        return schedule_trigger(self.config, audience)

    def build_scheduler(self) -> BackgroundScheduler:
        """A scheduler with one job per enabled audience plus the sweep."""
        settings = self.config.daemon
        scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(settings.workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        now = datetime.now(UTC)
        for audience in self.audiences:
            options: dict[str, Any] = {}
            if settings.run_on_start:
                options["next_run_time"] = now
            scheduler.add_job(
                self.run_audience,
                self._trigger(audience),
                args=[audience],
                id=f"audience:{audience.trait_key}",
                name=audience.trait_key,
                **options,
            )
        scheduler.add_job(
            self.sweep,
            IntervalTrigger(seconds=settings.sweep_interval, timezone=UTC),
            id="sweep",
            name="retry sweep",
        )
        return scheduler

    def next_runs(self) -> dict[str, datetime]:
        """When the scheduler will next run each audience (by key; this host's clock)."""
        scheduler = self._scheduler
        if scheduler is None or not scheduler.running or self.stop.is_set():
            return {}
        return {
            job.name: job.next_run_time
            for job in scheduler.get_jobs()
            if job.id.startswith("audience:") and job.next_run_time is not None
        }

    def scheduler_running(self) -> bool:
        """Whether the daemon is scheduling runs (``/readyz``)."""
        scheduler = self._scheduler
        return scheduler is not None and bool(scheduler.running) and not self.stop.is_set()

    def start_monitor(self) -> MonitorServer | None:
        """Serve /metrics, /healthz, /readyz and the status page on ``[daemon] http``
        (None when turned off, or when the address cannot be bound: the daemon runs on)."""
        setting = self.config.daemon.http
        if not setting:
            return None
        address = parse_listen_address(setting)
        try:
            monitor = MonitorServer(
                address,
                config=self.config,
                engine=self.engine,
                metrics=self.metrics,
                readiness=Readiness(self.scheduler_running),
                daemon_id=self.daemon_id,
            )
        except OSError as exc:
            logger.error(
                "cannot serve metrics and the status page on %s: %s ([daemon] http; "
                'http = "" turns it off); running without them',
                setting,
                exc.strerror or exc,
            )
            return None
        monitor.start()
        if not address.loopback:
            logger.warning(
                "metrics and the status page are served on %s without authentication: "
                "anyone who can reach it sees audience names, counts and run errors",
                setting,
            )
        logger.info("serving metrics, health checks and the status page on %s", monitor.url)
        return monitor

    def serve(self, install_signal_handlers: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or ``stop``); then finish in-flight batches and exit."""
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
        self.warn_about_drift()
        scheduler = self._scheduler = self.build_scheduler()
        heartbeat = Heartbeat(
            self.engine, self.daemon_id, self.next_runs, after_beat=self.metrics.refresh
        )
        heartbeat.start()  # the daemon's row first: its runs may start at once
        self._heartbeat = heartbeat
        try:
            self.monitor = self.start_monitor()  # /healthz answers during the start-up retire
            # Orphans before the first runs: their false or nulls go before a computation
            # takes over their names, for startup_retire_seconds at most (a destination down
            # must not hold every run back for the delivery budget); the sweeps go on.
            if self.config.defaults.on_removed == "retire":
                logger.info(
                    "retiring what was removed from the config before the first runs (for %gs "
                    "at most; the sweeps retry what is left)",
                    self.startup_retire_seconds,
                )
            self._retire_removed_safely(time_budget=self.startup_retire_seconds)
            if self.stop.is_set():
                return 0  # stopped during the start-up retire: nothing else started
            scheduler.start()
            heartbeat.wake()  # write the scheduler's next runs now
            logger.info(
                "daemon started: %d audience(s), %d worker(s), sweep every %gs",
                len(self.audiences),
                self.config.daemon.workers,
                self.config.daemon.sweep_interval,
            )
            while not self.stop.wait(0.2):
                pass
            logger.info("stopping: no new runs; finishing the batches in flight")
            scheduler.shutdown(wait=False)
            idle = self.wait_idle(self.config.daemon.shutdown_timeout)
        finally:
            self._heartbeat = None
            heartbeat.stop()  # deletes its row: `status` says no daemon runs
            if self.monitor is not None:
                self.monitor.stop()
        return 0 if idle else 1

    def wait_idle(self, timeout: float) -> bool:
        """Wait for running jobs to finish; False if some still run after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.error(
                        "%d run(s) still busy after %gs; their leases expire on their own",
                        self._active,
                        timeout,
                    )
                    return False
                self._idle.wait(remaining)
        logger.info("stopped cleanly")
        return True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        self.stop.set()
