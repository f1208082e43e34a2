"""The daemon's sweep with ``on_removed = "retire"`` and a removed computation (an orphan) whose
destination fails: the sweep's retire is bounded, its failure is logged once per reason, and a
stop meanwhile is prompt. The real daemon runs in a thread against the real receiver."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import select

from sync.scheduler import Daemon
from sync.state.tables import AUDIENCES
from tests.harness import Harness
from tests.processes import wait_for
from tests.receiver import Receiver, Request, Scripted
from tests.test_drift import CHURNED, KEY, OTHER

DAEMON = '\n[daemon]\nsweep_interval = "1s"\nrun_on_start = false\nhttp = ""\n'


class CountingDaemon(Daemon):
    """The daemon, counting the sweeps it finished (what a test waits for)."""

    sweeps = 0

    def sweep(self) -> None:
        super().sweep()
        self.sweeps += 1


def refuse_false(status: int) -> Callable[[Request], Scripted | None]:
    """A receiver hook answering ``status`` to every batch carrying the orphan's ``false``."""

    def answer(request: Request) -> Scripted | None:
        if any(m.get("traits", {}).get(OTHER) is False for m in request.body["batch"]):
            return Scripted(status, body='{"error": "down"}')
        return None

    return answer


def refused(receiver: Receiver) -> int:
    """How many batches carrying the orphan's ``false`` were refused so far."""
    with receiver.lock:
        return sum(1 for r in receiver.requests if r.status not in (200, None))


@contextmanager
def daemon_log() -> Iterator[list[logging.LogRecord]]:
    """The daemon's log records while the block runs (whatever a CLI test configured)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("sync.daemon")
    handler, level = Collect(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def not_retired(records: list[logging.LogRecord]) -> list[str]:
    """The daemon's ERROR lines saying the orphan was not retired."""
    return [
        r.getMessage()
        for r in list(records)
        if r.levelno == logging.ERROR and f'"{OTHER}" not retired' in r.getMessage()
    ]


@contextmanager
def running(daemon: CountingDaemon) -> Iterator[CountingDaemon]:
    """``daemon.serve()`` in a thread until the block ends; a stop then must end it."""
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        wait_for(daemon.scheduler_running, 30, "the start-up retire to end")
        yield daemon
    finally:
        daemon.stop.set()
        thread.join(60)
    assert not thread.is_alive()


def more_sweeps(daemon: CountingDaemon, count: int) -> None:
    seen = daemon.sweeps
    wait_for(lambda: daemon.sweeps >= seen + count, 30, f"{count} more sweeps")


def orphan(harness: Harness) -> None:
    """Churned (member c1) synced, then removed from the config of a daemon that retires
    removed computations; its sweep every second, the real default delivery budget."""
    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    assert harness.sync().status == "succeeded"
    assert harness.sync_named(OTHER).status == "succeeded"
    harness.defaults.update(on_removed="retire", schedule="1h", delivery_time_budget="10m")
    harness.config_extra = DAEMON


def daemon_of(harness: Harness) -> CountingDaemon:
    daemon = CountingDaemon(harness.config(), harness.engine)
    daemon.startup_retire_seconds = 0.5
    return daemon


def retired(harness: Harness) -> bool:
    with harness.engine.connect() as connection:
        query = select(AUDIENCES.c.retired_at).where(AUDIENCES.c.key == OTHER)
        return connection.execute(query).scalar_one() is not None


def test_an_orphan_whose_destination_fails_does_not_hold_the_sweep_back(
    harness: Harness, receiver: Receiver
) -> None:
    """Each sweep's retire of an orphan answered 503 delivered for the whole delivery budget
    (10 minutes by default) while APScheduler skipped the next sweeps: the leftovers of the
    other audiences waited (hostile review). The sweep's retire is bounded as the start-up
    one is; the orphan's rows stay pending and go at a later sweep."""
    orphan(harness)
    # A leftover of the configured audience: b's true was refused (503), it waits for a sweep.
    harness.set_members(["a", "b", "c1"])
    harness.defaults["delivery_time_budget"] = "1s"
    receiver.forced = "503"
    assert harness.sync().status == "partial"
    receiver.forced = None
    harness.defaults["delivery_time_budget"] = "10m"
    receiver.on_request = refuse_false(503)
    with daemon_log() as records, running(daemon_of(harness)) as daemon:
        wait_for(lambda: receiver.state.get(("b", KEY)) is True, 30, "the sweep to deliver b")
        tried = refused(receiver)
        more_sweeps(daemon, 3)
        assert refused(receiver) > tried  # the orphan's false is retried at the sweeps
        assert not retired(harness)
        # Logged once (by the start-up retire), not on every sweep.
        assert len(not_retired(records)) == 1, not_retired(records)
        receiver.on_request = None
        wait_for(lambda: retired(harness), 30, "a sweep to retire the orphan")
    assert receiver.state[("c1", OTHER)] is False
    assert len(not_retired(records)) == 1, not_retired(records)
    assert [r for r in records if "retired after sending false to 1 member" in r.getMessage()]


def test_an_orphan_s_failure_is_logged_once_per_reason(
    harness: Harness, receiver: Receiver
) -> None:
    """An orphan's failure was logged the first time only, ever: a later, different failure
    of it stayed silent (hostile review). Now each change of reason is logged once, and an
    orphan retired is forgotten: if it comes back and fails, that is logged again."""
    orphan(harness)
    receiver.on_request = refuse_false(503)
    with daemon_log() as records, running(daemon_of(harness)) as daemon:
        wait_for(lambda: len(not_retired(records)) == 1, 30, "the first failure")
        more_sweeps(daemon, 3)
        receiver.on_request = refuse_false(401)
        wait_for(lambda: len(not_retired(records)) == 2, 30, "the second reason")
        more_sweeps(daemon, 3)
        receiver.on_request = refuse_false(503)
        wait_for(lambda: len(not_retired(records)) == 3, 30, "the first reason again")
        more_sweeps(daemon, 3)
        first, second, third = not_retired(records)
        assert "not delivered yet" in first and "HTTP 401" in second and third == first
        assert "503" in first  # why they are not delivered yet
        receiver.on_request = None
        wait_for(lambda: retired(harness), 30, "a sweep to retire the orphan")
        # Another config brings the key back (the daemon's own config still lacks it): the
        # orphan fails again for its first reason, which is logged again.
        receiver.on_request = refuse_false(503)
        harness.config_extra = DAEMON + CHURNED + "allow_key_reuse = true\n"
        assert harness.sync_named(OTHER, wait=30).status == "succeeded"
        wait_for(lambda: len(not_retired(records)) == 4, 30, "the comeback's failure")
        more_sweeps(daemon, 3)
        assert not_retired(records)[3] == first
        assert len(not_retired(records)) == 4, not_retired(records)
        assert daemon.failures == 4


def test_a_stop_during_the_sweep_s_retire_is_prompt(harness: Harness, receiver: Receiver) -> None:
    """SIGTERM (which sets the daemon's stop) while a sweep retires an orphan whose
    destination answers 503 ends the daemon at once, not at the end of the retire's budget."""
    orphan(harness)
    receiver.on_request = refuse_false(503)
    daemon = daemon_of(harness)
    daemon.sweep_retire_seconds = 120.0  # the sweep's retire would go on for 2 minutes
    with daemon_log() as records, running(daemon):
        tried = refused(receiver)  # the start-up retire's
        wait_for(lambda: refused(receiver) > tried + 2, 30, "a sweep to retire the orphan")
        asked = time.monotonic()
        daemon.stop.set()
    assert time.monotonic() - asked < 10
    assert [r for r in records if r.getMessage() == "stopped cleanly"]
    assert not retired(harness)


AARDVARK = """
[[audiences]]
name = "Aardvark"
source = "warehouse"
query = "SELECT user_id FROM members WHERE user_id LIKE 'a%'"
destinations = ["segment"]
"""


def test_an_orphan_that_hangs_does_not_keep_the_others_from_being_retired(
    harness: Harness, receiver: Receiver
) -> None:
    """Orphans were tried in key order and none started once the budget was spent: one whose
    destination hung for the whole budget (a request timing out) was the only one ever tried,
    at start-up and at every sweep, and the others kept their `true` for good (hostile
    review). Each retire now starts after the last orphan the previous one tried."""
    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED + AARDVARK
    assert harness.sync().status == "succeeded"
    assert harness.sync_named(OTHER).status == "succeeded"
    assert harness.sync_named("Aardvark").status == "succeeded"
    harness.defaults.update(on_removed="retire", schedule="1h")
    harness.destinations["segment"]["timeout"] = 1
    harness.config_extra = DAEMON
    release = threading.Event()

    def hang(request: Request) -> Scripted | None:
        if any(m.get("traits", {}).get("aardvark") is False for m in request.body["batch"]):
            release.wait(30)  # past the client's timeout
            return Scripted(503, body='{"error": "down"}')
        return None

    receiver.on_request = hang
    daemon = daemon_of(harness)
    daemon.sweep_retire_seconds = 0.5  # less than one request's timeout
    try:
        with running(daemon):
            wait_for(lambda: retired(harness), 30, "a sweep to retire the other orphan")
    finally:
        release.set()
    assert receiver.state[("c1", OTHER)] is False


def test_an_orphan_s_failure_with_a_changing_body_is_logged_once(
    harness: Harness, receiver: Receiver
) -> None:
    """A 503 whose body carries a request id (a load balancer's) made a new "reason" at every
    sweep, so the same outage was logged at each one (hostile review)."""
    orphan(harness)
    harness.defaults["retry_initial_delay"] = "0.01s"
    answered = [0]

    def gateway(request: Request) -> Scripted | None:
        if any(m.get("traits", {}).get(OTHER) is False for m in request.body["batch"]):
            answered[0] += 1
            return Scripted(503, body=f'{{"error": "down", "request_id": "r{answered[0]}"}}')
        return None

    receiver.on_request = gateway
    with daemon_log() as records, running(daemon_of(harness)) as daemon:
        wait_for(lambda: len(not_retired(records)) == 1, 30, "the first failure")
        tried = answered[0]
        more_sweeps(daemon, 4)
        assert answered[0] > tried  # retried at the sweeps, each answer another body
        assert len(not_retired(records)) == 1, not_retired(records)
