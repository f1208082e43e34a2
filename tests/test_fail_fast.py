"""Fail fast on a dead destination: after ``max_connection_failures`` consecutive connection
failures, delivery to it stops for this run; its rows stay pending and the run is partial."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from sync.delivery import sending
from sync.delivery.sending import ConnectionFailures
from sync.state.tables import RUN_DELIVERIES
from tests.harness import WRITE_KEY, Harness
from tests.processes import spawn
from tests.receiver import Receiver

# The acceptance bound for a refusing receiver with the default settings.
ACCEPTANCE_SECONDS = 30


def closed_port_url() -> str:
    """A local URL nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sync_within_the_bound(config: Path, log: Path) -> tuple[int, str]:
    """`sync` in a process of its own: its exit code and log, failing the test unless it
    ends within ``ACCEPTANCE_SECONDS``."""
    started = time.monotonic()
    process = spawn(config, "sync", log=log)
    try:
        code = process.wait(timeout=ACCEPTANCE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        message = f"still running after {ACCEPTANCE_SECONDS}s: {log.read_text()}"
        raise AssertionError(message) from None
    assert time.monotonic() - started < ACCEPTANCE_SECONDS
    return code, log.read_text()


def test_sync_against_a_refusing_receiver_exits_3_naming_the_destination(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    # The default settings: a 10-minute time budget, 1 s … 60 s backoff, 5 failures.
    harness.defaults = {}
    harness.destinations = {
        "crm": {"type": "segment", "write_key": WRITE_KEY, "endpoint": closed_port_url()}
    }
    harness.audience["destinations"] = ["crm"]
    harness.set_members([f"u{i:03d}" for i in range(250)])  # one batch: the slowest case
    config = harness.write_config()
    code, output = sync_within_the_bound(config, tmp_path / "sync.log")
    assert code == 3, output
    # Every connection warning names the destination, and so does the line that gives up.
    warnings = [line for line in output.splitlines() if "ConnectError" in line]
    assert warnings and all('destination "crm"' in line for line in warnings), output
    assert '"crm"' in output and "5 consecutive connection failures" in output, output
    assert "stops for this run" in output

    rows = harness.memberships("crm")
    assert len(rows) == 250
    assert all(
        r.status == "pending" and r.synced_value is None and not r.in_doubt for r in rows.values()
    )
    (run,) = harness.runs()
    assert run.status == "partial" and run.sent == 0
    with harness.engine.connect() as connection:
        (entry,) = connection.execute(select(RUN_DELIVERIES)).all()
    assert entry.left_pending == 250
    assert entry.error and "5 consecutive connection failures" in entry.error


def test_a_sync_of_many_audiences_gives_up_on_a_dead_destination_once(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """Six audiences delivering to one refusing destination in one `sync` (the demo's count):
    each counted its own five failures with their backoff, 38 s in all (hostile review). Once
    one gave up, the others stop at their first connection failure: exit 3 within the 30 s."""
    harness.defaults = {}
    harness.destinations = {
        "crm": {"type": "segment", "write_key": WRITE_KEY, "endpoint": closed_port_url()}
    }
    harness.audience["destinations"] = ["crm"]
    harness.set_members([f"u{i:03d}" for i in range(20)])
    harness.config_extra = "".join(
        f'\n[[audiences]]\nname = "Also {n}"\nsource = "warehouse"\n'
        f'query = "SELECT user_id, email FROM members"\ndestinations = ["crm"]\n'
        for n in range(5)
    )
    config = harness.write_config()
    code, output = sync_within_the_bound(config, tmp_path / "sync.log")
    assert code == 3, output
    runs = harness.runs()
    assert len(runs) == 6 and {run.status for run in runs} == {"partial"}, output
    # Backoff waits ("retry N in …s") only for the first audience's five failures.
    assert len([line for line in output.splitlines() if "; retry " in line]) == 4, output
    gave_up = [line for line in output.splitlines() if " ERROR " in line and '"crm"' in line]
    assert len(gave_up) == 6 and "5 consecutive connection failures" in gave_up[0], output
    assert all("unreachable: an earlier delivery gave up on it" in g for g in gave_up[1:])


def test_max_connection_failures_is_configurable(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["endpoint"] = closed_port_url()
    harness.defaults["max_connection_failures"] = 1
    harness.set_members(["a", "b"])
    report = harness.sync()
    assert report.status == "partial"
    (entry,) = report.destinations
    assert entry.error and "1 consecutive connection failure:" in entry.error
    assert 'destination "segment"' in entry.error and entry.left_pending == 2


def test_an_answer_resets_the_count() -> None:
    failures = ConnectionFailures(limit=3)
    assert [failures.failed() for _ in range(2)] == [False, False]
    failures.answered()
    assert [failures.failed() for _ in range(3)] == [False, False, True]


def test_a_destination_given_up_on_needs_one_failure_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a delivery gave up on a destination, the next one to it (another computation)
    stops at its first connection failure; an answer, or ``UNREACHABLE_SECONDS``, ends that."""
    name = "given-up-test"
    first = ConnectionFailures(3, name)
    assert [first.failed() for _ in range(3)] == [False, False, True]
    second = ConnectionFailures(3, name)
    assert second.failed() and second.given_up_at is not None
    second.answered()  # it is reachable again
    assert [ConnectionFailures(3, name).failed() for _ in range(2)] == [False, False]
    assert ConnectionFailures(3, "another").failed() is False  # per destination
    again = ConnectionFailures(1, name)
    assert again.failed()
    monkeypatch.setattr(sending, "UNREACHABLE_SECONDS", 0.0)
    assert ConnectionFailures(3, name).failed() is False  # the mark has expired
