"""One runner per audience: the lease outlives slow destinations, fences a run that lost it,
and is judged by the state database's clock, not the host's."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from sync import clock
from sync.engine import RunHooks, RunOptions, RunReport, Syncer
from sync.errors import LeaseHeldError
from sync.state.audiences import ensure_audience
from sync.state.leases import Lease
from sync.state.tables import AUDIENCES, MEMBERSHIPS
from tests.harness import Harness
from tests.processes import wait_for
from tests.receiver import Receiver, Scripted


def _database_now(connection: Any) -> datetime:
    """The database's clock, read without our code (PostgreSQL: aware; MySQL: naive UTC)."""
    if connection.dialect.name == "postgresql":
        return connection.execute(text("SELECT now()")).scalar()
    return connection.execute(text("SELECT UTC_TIMESTAMP(6)")).scalar().replace(tzinfo=UTC)


MEMBERS = [f"u{i:03d}" for i in range(30)]


def _start_in_thread(syncer: Syncer, harness: Harness) -> tuple[threading.Thread, list[Any]]:
    """Run one sync in a thread; its report (or exception) lands in the returned list."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(syncer.sync(syncer.config.audiences[0], RunOptions()))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _lease_expires_at(harness: Harness) -> Any:
    with harness.engine.connect() as connection:
        return connection.execute(select(AUDIENCES.c.lease_expires_at)).scalar()


def test_a_retry_after_longer_than_the_lease_keeps_the_lease(
    harness: Harness, receiver: Receiver
) -> None:
    """A worker waits out `Retry-After: 3` with a one-second lease: the heartbeat keeps the
    lease, so a second sync started meanwhile is refused and nobody is messaged twice."""
    harness.set_members(MEMBERS)
    receiver.script = [Scripted(429, headers={"Retry-After": "3"})]
    config = harness.config()
    first = Syncer(config, harness.engine)
    first.lease_seconds = 1.0
    thread, outcome = _start_in_thread(first, harness)
    wait_for(lambda: len(receiver.requests) >= 1, 20, "the first run's throttled batch")
    taken = _lease_expires_at(harness)
    # Past the lease's first expiry, by the state DB's clock, while the worker still waits.
    wait_for(
        lambda: clock.local_now() > taken + timedelta(seconds=0.5), 10, "the first expiry"
    )
    second = Syncer(config, harness.engine)
    second.lease_seconds = 1.0
    with pytest.raises(LeaseHeldError):
        second.sync(config.audiences[0], RunOptions())
    thread.join(30)
    report = outcome[0]
    assert isinstance(report, RunReport) and report.status == "succeeded", outcome
    counts = Counter(m["userId"] for m in receiver.messages())
    assert counts == Counter(MEMBERS)
    assert [run.status for run in harness.runs()] == ["succeeded"]


def test_a_run_that_lost_its_lease_neither_sends_nor_writes(
    harness: Harness, receiver: Receiver
) -> None:
    """The first run's heartbeat stalls while it waits out a `Retry-After`; its lease expires
    and a second run takes over and delivers everything. The first wakes up, sends nothing
    more and writes nothing: its run stays `abandoned` as the second recorded it."""
    harness.set_members(MEMBERS)
    receiver.script = [Scripted(429, headers={"Retry-After": "4"})]
    config = harness.config()
    stalled: list[Lease] = []
    first = Syncer(config, harness.engine, hooks=RunHooks(on_lease=stalled.append))
    first.lease_seconds = 1.0
    first_thread, first_outcome = _start_in_thread(first, harness)
    wait_for(lambda: bool(stalled), 20, "the first run's lease")
    stalled[0].heartbeat_paused.set()
    wait_for(lambda: len(receiver.requests) >= 1, 20, "the first run's throttled batch")
    second = Syncer(config, harness.engine)
    second_report = second.sync(config.audiences[0], RunOptions(wait=10))
    assert second_report.status == "succeeded"
    first_thread.join(30)
    first_report = first_outcome[0]
    assert isinstance(first_report, RunReport), first_outcome
    assert first_report.status == "abandoned"
    assert "lease" in (first_report.error or "")
    counts = Counter(m["userId"] for m in receiver.messages())
    assert counts == Counter(MEMBERS), "a member was messaged by both runs"
    runs = harness.runs()
    assert [run.status for run in runs] == ["abandoned", "succeeded"]
    assert "lease expired" in runs[0].error
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}


@pytest.fixture
def host_clock_ahead(monkeypatch: pytest.MonkeyPatch) -> timedelta:
    """This host's clock three minutes ahead of the state database's."""
    skew = timedelta(seconds=180)
    real = clock.local_now
    monkeypatch.setattr(clock, "local_now", lambda: real() + skew)
    return skew


def test_a_host_whose_clock_is_ahead_does_not_take_a_live_lease(
    harness: Harness, host_clock_ahead: timedelta
) -> None:
    if harness.engine.dialect.name == "sqlite":
        pytest.skip("SQLite: every process shares one machine's clock")
    harness.set_members(MEMBERS)
    config = harness.config()
    with harness.engine.begin() as connection:
        audience_id = ensure_audience(connection, config.audiences[0])
        # A run on another host holds the lease for another minute by the state DB's clock.
        database_now = _database_now(connection)
        connection.execute(
            update(AUDIENCES)
            .where(AUDIENCES.c.id == audience_id)
            .values(
                lease_owner="elsewhere:1:abc:def",
                lease_acquired_at=database_now,
                lease_expires_at=database_now + timedelta(seconds=60),
            )
        )
    with pytest.raises(LeaseHeldError, match="elsewhere"):
        Syncer(config, harness.engine).sync(config.audiences[0], RunOptions())


def test_changed_at_comes_from_the_state_databases_clock(
    harness: Harness, receiver: Receiver, host_clock_ahead: timedelta
) -> None:
    """Message timestamps of one member must not invert between hosts: `changed_at` (each
    message's `timestamp`) is the state DB's time, not the planning host's."""
    harness.set_members(MEMBERS[:3])
    assert harness.sync().status == "succeeded"
    with harness.engine.connect() as connection:
        database_now = clock.state_now(connection) if harness.engine.dialect.name != "sqlite" else None
        stamps = connection.execute(select(MEMBERSHIPS.c.changed_at)).scalars().all()
    if database_now is None:
        pytest.skip("SQLite: the host's clock is the database's")
    for stamp in stamps:
        assert abs(stamp - database_now) < timedelta(seconds=60), (stamp, database_now)


def test_the_state_clock_follows_the_database(state_engine: Any, host_clock_ahead: timedelta) -> None:
    with state_engine.connect() as connection:
        estimated = clock.StateClock(connection).now()
        actual = clock.state_now(connection)
    if state_engine.dialect.name == "sqlite":
        assert abs(estimated - actual) < timedelta(seconds=5)
    else:
        assert abs(estimated - actual) < timedelta(seconds=5)
        assert abs(clock.local_now() - actual - host_clock_ahead) < timedelta(seconds=5)



def test_audiences_planned_side_by_side_do_not_deadlock(
    harness: Harness, receiver: Receiver
) -> None:
    """Two audiences' runs at once (the daemon's workers): each cleans up its own staged rows
    only. On MariaDB the cleanup's DELETE used to lock the other plan's rows: a deadlock."""
    harness.config_extra = """
[[audiences]]
name = "Second"
source = "warehouse"
query = "SELECT user_id FROM members WHERE user_id LIKE 'u1%' OR user_id LIKE 'u2%'"
destinations = ["segment"]
"""
    config_changes = [[f"u{i:04d}" for i in range(start, start + 1500)] for start in range(0, 1800, 300)]
    for members in config_changes:
        harness.set_members(members)
        config = harness.config()
        outcomes: list[Any] = []

        def run(audience: Any, config: Any = config, outcomes: list[Any] = outcomes) -> None:
            try:
                outcomes.append(Syncer(config, harness.engine).sync(audience, RunOptions()))
            except BaseException as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=run, args=(a,)) for a in config.audiences]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(isinstance(o, RunReport) and o.status == "succeeded" for o in outcomes), [
            getattr(o, "error", o) for o in outcomes
        ]


def test_a_busy_trait_group_is_named_a_trait_group(harness: Harness) -> None:
    """The lease's messages said 'audience "Plans" is being synced by …' of a trait group."""
    harness.warehouse_sql("CREATE TABLE t (user_id TEXT, plan TEXT)")
    harness.config_extra = (
        '[[traits]]\nname = "Plans"\nsource = "warehouse"\nquery = "SELECT * FROM t"\n'
        'destinations = ["segment"]\n'
    )
    config = harness.config()
    group = next(c for c in config.computations if c.name == "Plans")
    with harness.engine.begin() as connection:
        group_id = ensure_audience(connection, group)
    held = Lease(harness.engine, group_id, group.title, "elsewhere:1:abc", 60.0)
    held.acquire(0.0)
    try:
        with pytest.raises(LeaseHeldError, match=r'^trait group "Plans" is being synced by'):
            harness.sync_named("Plans")
    finally:
        held.release()


def test_a_holder_stalled_in_an_acknowledgement_does_not_block_its_successor(
    harness: Harness, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run freezes (a stopped process, a host cut off from the state DB) inside a batch's
    acknowledgement transaction, after its UPDATE, before its fence and commit. Its lease
    expires and a second run takes it over: that run waited on the frozen transaction's row
    locks for as long as it stayed frozen (PostgreSQL: for ever; MariaDB: the lock wait
    timeout, then `failed`). A delivery's write transaction may now stay idle no longer than
    the lease lives: the server ends it and its locks go (hostile review)."""
    if harness.engine.dialect.name == "sqlite":
        pytest.skip("SQLite: a frozen writer holds the one write lock (README: Guarantees)")
    harness.set_members(MEMBERS)
    config = harness.config()
    stalled: list[Lease] = []
    frozen, freeze = threading.Event(), threading.Event()
    fence = Lease.fence

    def frozen_fence(self: Lease, connection: Any) -> None:
        delivering = threading.current_thread().name.startswith(("deliver", "record"))
        if stalled and self is stalled[0] and delivering and not frozen.is_set():
            self.heartbeat_paused.set()
            frozen.set()
            freeze.wait(60)  # frozen with the acknowledgement's row locks held
        fence(self, connection)

    monkeypatch.setattr(Lease, "fence", frozen_fence)
    first = Syncer(config, harness.engine, hooks=RunHooks(on_lease=stalled.append))
    first.lease_seconds = 1.0
    first_run, first_outcome = _start_in_thread(first, harness)
    try:
        wait_for(frozen.is_set, 20, "the first run frozen in an acknowledgement")
        taken = _lease_expires_at(harness)
        wait_for(
            lambda: clock.local_now() > taken + timedelta(seconds=0.5), 10, "the lease's expiry"
        )
        second = Syncer(config, harness.engine)
        second.lease_seconds = 1.0
        second_run, second_outcome = _start_in_thread(second, harness)
        second_run.join(20)  # the frozen run stays frozen for up to 60 s
        finished = not second_run.is_alive()
    finally:
        freeze.set()
        first_run.join(30)
    assert finished, "the successor waited on the frozen run's transaction"
    report = second_outcome[0]
    assert isinstance(report, RunReport) and report.status == "succeeded", second_outcome
    assert Counter(m["userId"] for m in receiver.messages()) >= Counter(MEMBERS)
    assert all(row.status == "in_sync" for row in harness.memberships().values())
    # The frozen run, thawed, could not commit its acknowledgement over the successor's.
    assert first_outcome and not (
        isinstance(first_outcome[0], RunReport) and first_outcome[0].status == "succeeded"
    ), first_outcome
