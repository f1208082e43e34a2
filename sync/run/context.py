"""What every run of a ``Syncer`` shares, and the one path run, sweep and retire take through
it: take the audience's lease, keep a run record, open its destinations, deliver; once the run
is recorded, its alerts (``sync.alerts``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from sqlalchemy import Engine

from sync.alerts import Alerter
from sync.config import ComputationConfig, Config
from sync.delivery import DeliveryHooks, ProgressFactory, RetryPolicy, deliver_destinations
from sync.destinations import Destination, build_destination
from sync.logs import RunTag, current_run
from sync.reports import DestinationReport, RunReport
from sync.run.record import log_summary
from sync.state.leases import Lease
from sync.state.memberships import DestinationTarget
from sync.state.runs import start_run
from sync.state.tables import ComputationKind, RunTrigger

logger = logging.getLogger("sync.runner")

# The destinations of a run, each beside the planner's view of it.
Targets = list[tuple[DestinationTarget, Destination]]


@dataclass(frozen=True)
class RunHooks:
    """Seams for fault drills and tests, called at their point of every run (a hook raises to
    stop the run there, as a crash would)."""

    # With each lease taken (e.g. to stall its heartbeat).
    on_lease: Callable[[Lease], None] | None = None
    # After each chunk of the source query is staged, in real and dry runs.
    after_chunk: Callable[[], None] | None = None
    # After each destination is planned, before the plan commits.
    after_plan: Callable[[], None] | None = None
    # Inside delivery: before and after each send, before each outcome is recorded.
    delivery: DeliveryHooks = field(default_factory=DeliveryHooks)


class RunContext:
    """The state engine, config, process id, stop event, hooks and retry policy of one
    ``Syncer``, and the steps its runs share."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        owner: str,
        stop: threading.Event,
        hooks: RunHooks,
    ) -> None:
        self.config = config
        self.engine = engine
        self.owner = owner
        self.stop = stop
        self.hooks = hooks
        self.lease_seconds = config.daemon.lease_seconds
        self.alerter = Alerter(config, engine)
        defaults = config.defaults
        self.policy = RetryPolicy(
            initial_delay=defaults.retry_initial_delay,
            max_delay=defaults.retry_max_delay,
            time_budget=defaults.delivery_time_budget,
            max_attempts=defaults.max_attempts,
            max_connection_failures=defaults.max_connection_failures,
        )

    def take_lease(self, audience_id: int, title: str, wait: float) -> Lease:
        """The audience's lease, waiting up to ``wait`` seconds (else ``LeaseHeldError``);
        ``title`` names it in messages (``ComputationConfig.title``: 'trait group "Plans"')."""
        lease = Lease(self.engine, audience_id, title, self.owner, self.lease_seconds)
        abandoned = lease.acquire(wait)
        if self.hooks.on_lease is not None:
            self.hooks.on_lease(lease)
        if abandoned:
            logger.warning(
                "%s: marked %d run(s) abandoned (their process crashed or lost its lease)",
                title,
                abandoned,
            )
        return lease

    @contextmanager
    def recorded_run(
        self,
        audience: ComputationConfig,
        audience_id: int,
        trigger: RunTrigger,
        report: RunReport,
        lease: Lease,
        started: float,
    ) -> Iterator[None]:
        """Start a run record under ``lease`` and tag log lines with it; afterwards release
        the lease, log the run's one summary line and, when the body ended normally, send the
        run's alerts. The body records the outcome."""
        token = None
        ended = False
        try:
            with self.engine.begin() as connection:
                lease.fence(connection)
                report.run_id = start_run(
                    connection, audience_id, owner=self.owner, trigger=trigger
                )
            token = current_run.set(RunTag(report.run_id, audience.trait_key))
            yield
            ended = True
        finally:
            lease.release()
            report.seconds = time.monotonic() - started
            log_summary(report)
            if ended:  # recorded; not on Ctrl-C, which must stop at once
                self.alerter.after_run(audience, audience_id, report)
            if token is not None:
                current_run.reset(token)

    @contextmanager
    def open_destinations(self, names: Iterable[str]) -> Iterator[Targets]:
        """The configured destinations ``names``, closed when the block ends."""
        targets: Targets = []
        try:
            for name in names:
                destination = build_destination(name, self.config.destinations[name])
                targets.append((DestinationTarget(name, destination.requires_user_id), destination))
            yield targets
        finally:
            for _, destination in targets:
                destination.close()

    def deliver(
        self,
        audience_id: int,
        key: str,
        install: str,
        targets: Targets,
        entries: list[DestinationReport],
        lease: Lease,
        progress: ProgressFactory | None = None,
        *,
        kind: ComputationKind = "audience",
        time_budget: float | None = None,
    ) -> str | None:
        """Deliver the pending rows of the audience or trait group ``key`` under ``lease``,
        filling ``entries``; return the error that stopped a destination, if any.
        ``time_budget`` shortens ``delivery_time_budget`` (the rest stays pending)."""
        policy = self.policy
        if time_budget is not None:
            policy = replace(policy, time_budget=min(policy.time_budget, time_budget))
        return deliver_destinations(
            self.engine,
            self.config,
            policy,
            audience_id=audience_id,
            key=key,
            install=install,
            pairs=targets,
            kind=kind,
            computation=self.config.find_audience(key),
            entries=entries,
            lease=lease,
            stop=self.stop,
            progress=progress,
            hooks=self.hooks.delivery,
        )
