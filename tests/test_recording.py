"""Recording batch outcomes: on SQLite a worker hands its batch's outcome to a recorder and
sends its next batch; everywhere, a failure to record stops the delivery at once and every
row it left is recovered by the next run."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from sync.delivery import DeliveryHooks
from sync.engine import RunHooks
from tests.harness import Harness
from tests.receiver import Receiver


def ledger_outcomes(harness: Harness) -> dict[str, list[str]]:
    """Each member's ledger outcomes, in the order they were appended."""
    outcomes: dict[str, list[str]] = {}
    with harness.engine.connect() as connection:
        rows = connection.execute(text("SELECT member_id, outcome FROM deliveries ORDER BY id"))
        for member, outcome in rows:
            outcomes.setdefault(member, []).append(outcome)
    return outcomes


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_on_sqlite_a_worker_sends_its_next_batch_while_its_last_is_recorded(
    harness: Harness, receiver: Receiver
) -> None:
    """One worker: the second batch reaches the destination while the first batch's outcome
    is still being recorded (the write turn overlaps the network round trip); the run ends
    only once every outcome is committed."""
    members = ["a", "b", "c", "d"]
    harness.set_members(members)
    harness.destinations["segment"].update(batch_size=2, concurrency=1)
    received_while_recording: list[int] = []
    first = [True]  # the hook runs in either of the two recorder threads

    def before_record() -> None:
        try:
            first.pop()
        except IndexError:
            return
        deadline = time.monotonic() + 10
        while len(receiver.batches()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        received_while_recording.append(len(receiver.batches()))

    harness.hooks = RunHooks(delivery=DeliveryHooks(before_record=before_record))
    report = harness.sync()
    assert received_while_recording == [2]
    assert report.status == "succeeded" and report.destinations[0].sent == 4
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}
    assert ledger_outcomes(harness) == {m: ["acknowledged"] for m in members}


def test_a_failure_to_record_stops_the_delivery_and_the_next_run_recovers(
    harness: Harness, receiver: Receiver
) -> None:
    """The state DB refuses the first outcome (a full disk, say): the run fails with that
    error, having sent only what was already under way — not the remaining batches — and the
    next run resends the unrecorded rows (in doubt) and converges."""
    members = [f"m{i:02d}" for i in range(40)]
    harness.set_members(members)
    harness.destinations["segment"].update(batch_size=1, concurrency=1)
    failed: list[bool] = []

    def before_record() -> None:
        if not failed:
            failed.append(True)
            raise OSError(28, "No space left on device")

    harness.hooks = RunHooks(delivery=DeliveryHooks(before_record=before_record))
    report = harness.sync()
    assert report.status == "failed" and "No space left on device" in (report.error or "")
    assert len(receiver.batches()) <= 5

    harness.hooks = RunHooks()
    assert harness.sync().status == "succeeded"
    assert {m["userId"] for m in receiver.messages()} == set(members)
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}
    outcomes = ledger_outcomes(harness)
    assert set(outcomes) == set(members)
    assert all(o[-1] == "acknowledged" for o in outcomes.values())


@pytest.mark.parametrize("state_url", ["postgresql", "mariadb"], indirect=True)
def test_twenty_workers_each_record_on_a_server_state_db(
    harness: Harness, receiver: Receiver
) -> None:
    """`concurrency = 20`: twenty batches in flight at once, each worker recording on a
    connection of its own — more than SQLAlchemy's default pool of 15 (which timed the run
    out waiting for a connection)."""
    members = [f"m{i:02d}" for i in range(40)]
    harness.set_members(members)
    harness.destinations["segment"].update(batch_size=1, concurrency=20)
    gate = threading.Event()
    receiver.gate = gate

    def open_gate_at_twenty() -> None:
        deadline = time.monotonic() + 30
        while receiver.arrivals < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()

    opener = threading.Thread(target=open_gate_at_twenty)
    opener.start()
    try:
        report = harness.sync()
    finally:
        gate.set()
        opener.join()
    assert report.status == "succeeded", report.error
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}
    assert ledger_outcomes(harness) == {m: ["acknowledged"] for m in members}
