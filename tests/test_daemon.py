"""The daemon and concurrent processes, as real subprocesses against a real receiver."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from sync.state.tables import AUDIENCES, RUNS
from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver

KEY = "high_value_users"


def two_audiences(harness: Harness) -> Path:
    harness.defaults["schedule"] = "1s"
    harness.config_extra = """
[daemon]
sweep_interval = "1s"
shutdown_timeout = "10s"
http = "127.0.0.1:0"

[[audiences]]
name = "Newsletter"
source = "warehouse"
query = "SELECT user_id FROM members WHERE email LIKE 'n%'"
destinations = ["segment"]
"""
    return harness.write_config()


def final_state(receiver: Receiver, key: str) -> dict[str, bool]:
    return {who: value for (who, k), value in receiver.state.items() if k == key}


def test_daemon_delivers_deltas_and_stops_cleanly(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.set_members(["a", ("n1", "n1@example.com")])
    config = two_audiences(harness)
    log = tmp_path / "daemon.log"
    daemon = spawn(config, "run", log=log)
    try:
        wait_for(lambda: final_state(receiver, KEY) == {"a": True, "n1": True}, 20, "first sync")
        wait_for(lambda: final_state(receiver, "newsletter") == {"n1": True}, 20, "second audience")
        harness.set_members(["b", ("n1", "n1@example.com"), ("n2", "n2@example.com")])
        wait_for(
            lambda: final_state(receiver, KEY) == {"a": False, "b": True, "n1": True, "n2": True},
            20,
            "deltas",
        )
        wait_for(
            lambda: final_state(receiver, "newsletter") == {"n1": True, "n2": True}, 20, "deltas 2"
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    output = log.read_text()
    assert code == 0, output
    assert "stopped cleanly" in output
    with harness.engine.connect() as connection:
        assert connection.execute(select(AUDIENCES.c.lease_owner)).scalars().all() == [None, None]
        statuses = set(connection.execute(select(RUNS.c.status)).scalars())
    assert "running" not in statuses and "succeeded" in statuses
    # Each change went out once: no duplicates from overlapping runs.
    counts = Counter(
        (m["userId"], m["traits"].get(KEY)) for m in receiver.messages() if KEY in m["traits"]
    )
    assert max(counts.values()) == 1


def test_concurrent_syncs_of_one_audience(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.destinations["segment"]["batch_size"] = 10
    harness.destinations["segment"]["concurrency"] = 1
    harness.destinations["segment"]["timeout"] = 90  # a batch held at the gate is not abandoned
    harness.set_members([f"u{i:03d}" for i in range(60)])
    config = harness.write_config()
    # The receiver holds the first process's first batch until the second has been refused.
    receiver.gate = threading.Event()
    first = spawn(config, "sync", log=tmp_path / "first.log")
    wait_for(lambda: receiver.arrivals >= 1, 30, "the first process to deliver")
    second = subprocess.run(
        [*first.args[:-1], "sync"], capture_output=True, text=True, timeout=60, check=False
    )
    receiver.gate.set()
    assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 1
    assert "is being synced by" in second.stdout and "since" in second.stdout
    counts = Counter(m["userId"] for m in receiver.messages())
    assert len(counts) == 60 and set(counts.values()) == {1}
    # With --wait the fourth process waits its turn, then finds nothing left to send.
    harness.set_members([f"u{i:03d}" for i in range(90)])
    receiver.gate = threading.Event()
    arrived = receiver.arrivals
    third = spawn(config, "sync", log=tmp_path / "third.log")
    wait_for(lambda: receiver.arrivals > arrived, 30, "the third process to deliver")
    fourth_log = tmp_path / "fourth.log"
    fourth = spawn(config, "--log-level", "INFO", "sync", "--wait", "30", "--json", log=fourth_log)
    wait_for(lambda: "waiting up to 30s" in fourth_log.read_text(), 30, "the fourth to wait")
    receiver.gate.set()
    assert third.wait(timeout=60) == 0, (tmp_path / "third.log").read_text()
    assert fourth.wait(timeout=60) == 0, fourth_log.read_text()
    assert '"sent": 0' in fourth_log.read_text()
    counts = Counter(m["userId"] for m in receiver.messages())
    assert len(counts) == 90 and set(counts.values()) == {1}


def test_sigkill_mid_delivery_then_recovery(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.destinations["segment"].update(batch_size=20, concurrency=1)
    # Long enough for the "busy" sync below to start (a CLI process) before it expires, on
    # two loaded cores too: with 5 s it sometimes found the lease expired and took it over.
    harness.config_extra = '\n[daemon]\nlease_seconds = "15s"\n'
    members = [f"u{i:03d}" for i in range(200)]
    harness.set_members(members)
    config = harness.write_config()
    receiver.delay = 0.2
    victim = spawn(config, "sync", log=tmp_path / "victim.log")
    wait_for(lambda: len(receiver.requests) >= 3, 30, "delivery to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    receiver.delay = 0
    # Change the snapshot while the crashed run's lease is still held.
    last = [*members[50:], "late-1", "late-2"]
    harness.set_members(last)
    busy = subprocess.run(
        [*victim.args[:-1], "sync"], capture_output=True, text=True, timeout=60, check=False
    )
    assert busy.returncode == 1 and "is being synced by" in busy.stdout
    after = subprocess.run(
        [*victim.args[:-1], "sync", "--wait", "40"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert after.returncode == 0, after.stdout + after.stderr
    with harness.engine.connect() as connection:
        statuses = connection.execute(select(RUNS.c.status).order_by(RUNS.c.id)).scalars().all()
    assert statuses == ["abandoned", "succeeded"]
    expected = {m: True for m in last} | {
        m: False for m in members[:50] if m in final_state(receiver, KEY)
    }
    assert final_state(receiver, KEY) == expected
    # Every member of the last snapshot is true at the receiver; nobody else is.
    assert {u for u, v in final_state(receiver, KEY).items() if v} == set(last)


def test_full_resync_while_the_daemon_runs(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.defaults["schedule"] = "1s"
    harness.config_extra = '\n[daemon]\nsweep_interval = "1s"\nhttp = ""\n'
    harness.set_members(["a", "b", "c"])
    config = harness.write_config()
    daemon = spawn(config, "run", log=tmp_path / "daemon.log")
    try:
        wait_for(lambda: len(receiver.messages()) == 3, 20, "first sync")
        full = subprocess.run(
            [*daemon.args[:-1], "sync", "--full", KEY, "--wait", "20"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert full.returncode == 0, full.stdout + full.stderr
        wait_for(lambda: len(receiver.messages()) >= 6, 10, "the resend")
        # Let the daemon finish two more scheduled runs: nothing more is sent.
        finished = len([r for r in harness.runs() if r.finished_at is not None])
        wait_for(
            lambda: len([r for r in harness.runs() if r.finished_at is not None]) >= finished + 2,
            30,
            "two more scheduled runs",
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    counts = Counter(m["userId"] for m in receiver.messages())
    assert counts == {"a": 2, "b": 2, "c": 2}
    assert len({m["messageId"] for m in receiver.messages()}) == 6


def test_run_once(harness: Harness, receiver: Receiver, tmp_path: Path) -> None:
    harness.set_members(["a"])
    config = harness.write_config()
    result = subprocess.run(
        [*spawn_args(config), "run", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_state(receiver, KEY) == {"a": True}
    assert "succeeded" in result.stdout + result.stderr  # the one summary line per run


def spawn_args(config: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "sync", "--config", str(config)]
