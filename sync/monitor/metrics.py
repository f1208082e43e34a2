"""The daemon's Prometheus metrics: counters of what its runs did, and gauges of what the
state database holds (refreshed with each heartbeat, not on each scrape, so a scrape never
waits on the state DB)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from sync.reports import RunReport
from sync.state.monitoring import DestinationCounts, destination_counts, last_successes

PREFIX = "audience_sync"
# Run durations span a small audience's second to a first sync of millions (~minutes).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The outcomes of `messages_total`, each a DestinationReport field counting this run's events.
# (Its `failed` is a state, the rows given up after max_attempts, so it is the gauge
# `failed_rows`: a counter would add the same rows again with every run.)
MESSAGE_OUTCOMES = ("sent", "rejected")


class _StateCollector(Collector):
    """Gauges read from the state DB: the last snapshot ``refresh`` took, swapped whole."""

    def __init__(self) -> None:
        self._counts: list[DestinationCounts] = []
        self._successes: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def refresh(self, connection: Connection) -> None:
        counts = destination_counts(connection)
        successes = last_successes(connection)
        with self._lock:
            self._counts, self._successes = counts, successes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts, successes = self._counts, self._successes
        labels = ["computation", "destination"]
        members = GaugeMetricFamily(
            f"{PREFIX}_members", "Members per computation and destination.", labels=labels
        )
        pending = GaugeMetricFamily(
            f"{PREFIX}_pending_rows",
            "Memberships waiting for delivery per computation and destination.",
            labels=labels,
        )
        failed = GaugeMetricFamily(
            f"{PREFIX}_failed_rows",
            "Memberships given up after max_attempts rejections (waiting for `audience-sync "
            "retry`) per computation and destination.",
            labels=labels,
        )
        for row in counts:
            members.add_metric([row.computation, row.destination], row.members)
            pending.add_metric([row.computation, row.destination], row.pending)
            failed.add_metric([row.computation, row.destination], row.failed)
        last = GaugeMetricFamily(
            f"{PREFIX}_last_success_timestamp_seconds",
            "When the last succeeded run of each computation finished (Unix time).",
            labels=["computation"],
        )
        for key, moment in sorted(successes.items()):
            last.add_metric([key], moment.timestamp())
        yield members
        yield pending
        yield failed
        yield last


class Metrics:
    """One daemon's metrics, in a registry of its own (several daemons can share a process
    in tests; nothing lands in prometheus_client's global registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter(
            f"{PREFIX}_runs",
            "Runs this daemon finished, by computation and status (a run that failed before "
            "it was recorded counts as failed).",
            ["computation", "status"],
            registry=self.registry,
        )
        self.messages = Counter(
            f"{PREFIX}_messages",
            "Messages of this daemon's runs, by computation, destination and outcome "
            "(sent: acknowledged; rejected: refused by the destination).",
            ["computation", "destination", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_run_duration_seconds",
            "How long this daemon's runs took, by computation.",
            ["computation"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    def observe(self, report: RunReport) -> None:
        """Count one finished run (``busy`` and dry runs are not runs)."""
        if report.run_id is None or report.dry_run:
            return
        self.runs.labels(report.key, str(report.status)).inc()
        self.duration.labels(report.key).observe(report.seconds)
        for entry in report.destinations:
            for outcome in MESSAGE_OUTCOMES:
                self.messages.labels(report.key, entry.destination, outcome).inc(
                    getattr(entry, outcome)
                )

    def observe_error(self, key: str) -> None:
        """Count a run that failed before it was recorded (a refused config drift, the state
        DB unreachable): ``failed``, like a recorded failure, so one alert covers both."""
        self.runs.labels(key, "failed").inc()

    def refresh(self, connection: Connection) -> None:
        """Re-read the gauges that come from the state DB."""
        self._state.refresh(connection)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
