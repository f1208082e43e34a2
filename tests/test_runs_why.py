"""`runs` says why a run was partial or failed (the per-destination reason and counts, a
failed count), and a sweep run records the audience's real member count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sync.cli import cli
from sync.engine import Syncer
from tests.harness import Harness
from tests.processes import wait_for
from tests.receiver import Receiver
from tests.test_fail_fast import closed_port_url


def invoke(config: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


def run_history(config: Path) -> tuple[list[dict[str, Any]], str]:
    """`runs --json` and the `runs` table."""
    return json.loads(invoke(config, "runs", "--json")), invoke(config, "runs")


def test_runs_shows_why_a_run_was_partial_or_failed(harness: Harness, receiver: Receiver) -> None:
    # 1. Rejected for good (max_attempts 1): partial, with a failed count.
    harness.defaults["max_attempts"] = 1
    receiver.poison = {"bad"}
    harness.set_members(["a", "b", "bad"])
    assert harness.sync().status == "partial"
    # 2. A destination that refuses connections: partial, the reason per destination.
    harness.destinations["segment"]["endpoint"] = closed_port_url()
    harness.defaults["max_connection_failures"] = 1
    harness.set_members(["a", "b", "bad", "c"])
    assert harness.sync(full=True).status == "partial"  # --full accepts the moved endpoint
    # 3. Bad credentials: failed.
    harness.destinations["segment"]["endpoint"] = receiver.url
    harness.destinations["segment"]["write_key"] = "revoked"
    assert harness.sync(full=True).status == "failed"

    config = harness.write_config()
    rows, table = run_history(config)
    failed, refused, rejected = rows
    assert rejected["status"] == "partial" and rejected["failed"] == 1
    assert rejected["why"] == "segment: 1 rejected, 1 failed"
    assert refused["status"] == "partial" and refused["error"] is None
    assert refused["why"].startswith("segment: 4 left pending: ")
    assert 'destination "segment": ConnectError' in refused["why"]
    assert "1 consecutive connection failure" in refused["why"]
    assert failed["status"] == "failed" and "rejected the credentials" in failed["why"]
    assert failed["why"].count("rejected the credentials") == 1  # not repeated per destination

    lines = table.splitlines()
    header = next(line for line in lines if "status" in line and "why" in line)
    assert "failed" in header
    assert any("segment: 1 rejected, 1 failed" in line for line in lines), table
    assert "ConnectError" in table and "rejected the credentials" in table
    assert "wk_test" not in table and "revoked" not in table  # secrets stay hidden


def test_a_sweep_records_the_audiences_member_count(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["delivery_time_budget"] = "1s"
    harness.set_members(["a", "b", "c"])
    receiver.forced = "429"  # refused for the whole budget: left pending with a retry time
    assert harness.sync().status == "partial"
    receiver.forced = None
    config = harness.config()
    syncer = Syncer(config, harness.engine)
    swept: list[Any] = []
    wait_for(
        lambda: bool(swept.append(syncer.sweep(config.audiences[0])) or swept[-1]),
        30,
        "the backoff to expire",
    )
    report = swept[-1]
    assert report.status == "succeeded" and report.members == 3
    sweep = harness.runs()[-1]
    assert (sweep.trigger, sweep.members, sweep.sent) == ("sweep", 3, 3)
    rows, table = run_history(harness.write_config())
    assert rows[0]["trigger"] == "sweep" and rows[0]["members"] == 3
    assert "sweep" in table


@pytest.mark.parametrize("mode", ["identify", "both"])
def test_an_abandoned_run_records_what_it_sent(
    mode: str, harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """A run killed mid-delivery is marked `abandoned` by its successor. It was recorded with
    `sent 0` although it had acknowledged many messages (hostile review): `runs` now counts
    them from the delivery ledger (its messages acknowledged, and rejected, after it started)."""
    import signal

    from sqlalchemy import select

    from sync.state.tables import DELIVERIES, RUNS
    from tests.processes import spawn

    harness.destinations["segment"].update(batch_size=10, concurrency=1, mode=mode)
    harness.config_extra = '\n[daemon]\nlease_seconds = "5s"\n'
    per_member = 2 if mode == "both" else 1  # an identify and a track
    receiver.poison = {"u005"}
    harness.set_members([f"u{i:03d}" for i in range(200)])
    config = harness.write_config()
    receiver.delay = 0.1

    def logged(outcome: str) -> int:
        with harness.engine.connect() as connection:
            rows = connection.execute(
                select(DELIVERIES.c.id).where(DELIVERIES.c.outcome == outcome)
            ).all()
        return len(rows)

    victim = spawn(config, "sync", log=tmp_path / "victim.log")
    wait_for(lambda: logged("acknowledged") >= 40, 60, "acknowledged batches")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    acknowledged = logged("acknowledged") // per_member
    rejected = logged("rejected") // per_member
    receiver.delay = 0
    resync = CliRunner().invoke(cli, ["--config", str(config), "sync", "--wait", "30"])
    assert resync.exit_code == 3, resync.output  # partial: u005 is rejected again
    with harness.engine.connect() as connection:
        runs = connection.execute(
            select(RUNS.c.status, RUNS.c.sent, RUNS.c.rejected).order_by(RUNS.c.id)
        ).all()
    assert tuple(runs[0]) == ("abandoned", acknowledged, rejected)
    assert runs[1].status in ("succeeded", "partial")
    assert runs[0].sent + runs[1].sent == 199  # every member once, but the poisoned one
    history, _ = run_history(config)
    abandoned = [run for run in history if run["status"] == "abandoned"]
    assert [run["sent"] for run in abandoned] == [acknowledged]
