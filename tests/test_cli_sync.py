"""The `sync` and `demo` commands through click's runner and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sync.cli import cli
from tests.harness import Harness
from tests.receiver import Receiver


def write_config(harness: Harness) -> Path:
    return harness.write_config()


def test_sync_command_table_and_json(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b"])
    path = write_config(harness)
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(path), "sync", "High Value Users"])
    assert result.exit_code == 0, result.output
    for header in (
        "members",
        "added",
        "removed",
        "sent",
        "rejected",
        "invalid",
        "skipped",
        "status",
    ):
        assert header in result.output
    assert "succeeded" in result.output and "high_value_users" in result.output

    harness.set_members(["a", "c"])
    result = runner.invoke(cli, ["--config", str(path), "sync", "high_value_users", "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["status"] == "succeeded"
    assert (report["destinations"][0]["added"], report["destinations"][0]["removed"]) == (1, 1)


def test_sync_dry_run_prints_the_plan(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b", "c"])
    path = write_config(harness)
    result = CliRunner().invoke(cli, ["--config", str(path), "sync", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (
        "Dry run" in result.output and "(3 to send)" in result.output and "planned" in result.output
    )
    assert receiver.requests == []
    assert harness.memberships() == {}


def test_sync_exits_non_zero_when_guarded_or_failed(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["guard_min_members"] = 2
    harness.set_members(["a", "b", "c"])
    path = write_config(harness)
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(path), "sync"]).exit_code == 0
    harness.set_members([])
    result = runner.invoke(cli, ["--config", str(path), "sync"])
    assert result.exit_code == 1 and "guarded" in result.output and "--force" in result.output
    result = runner.invoke(cli, ["--config", str(path), "sync", "--force"])
    assert result.exit_code == 0


def test_sync_usage_errors(harness: Harness) -> None:
    path = write_config(harness)
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(path), "sync", "nope"])
    assert (
        result.exit_code == 2
        and 'no audience named "nope" (keys: high_value_users)' in result.output
    )
    result = runner.invoke(cli, ["--config", str(path), "sync", "--include-exited"])
    assert result.exit_code == 2 and "--include-exited goes with --full" in result.output


def test_sync_refuses_an_out_of_date_schema(tmp_path: Path, state_url: str) -> None:
    from sqlalchemy import Engine

    from sync.state.db import make_state_engine

    engine: Engine = make_state_engine(state_url)
    try:
        harness = Harness(tmp_path, engine)
        path = write_config(harness)
        result = CliRunner().invoke(cli, ["--config", str(path), "sync"])
        assert result.exit_code == 1
        if state_url.startswith("sqlite"):
            # A refused command creates no empty state DB file (issue 15).
            assert "does not exist; run `audience-sync db upgrade` to create it" in result.output
            assert not (tmp_path / "state.db").exists()
        else:
            assert "no schema yet; run `audience-sync db upgrade`" in result.output
    finally:
        engine.dispose()


def test_demo_runs_offline_and_shows_a_full_send_then_deltas(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "sync", "demo", "--dir", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Pass 1: first sync" in out and "Pass 2: only the changes" in out
    assert "Pass 3 without changes sent 0 messages" in out
    for key in ("order_completed_last_30days", "high_value_users", "trial_expiring_7d"):
        assert key in out
    lines = (folder / "out" / "messages.jsonl").read_text().splitlines()
    messages = [json.loads(line) for line in lines]
    exits = [m for m in messages if False in m["traits"].values()]
    assert exits, "the second pass should send some false values"
    assert len(messages) > 1000


def test_demo_never_recreates_a_folder_it_did_not_write(tmp_path: Path) -> None:
    """`demo --dir .` in a folder set up by `init` wiped the user's config, state DB and
    output (hostile review); a folder the demo wrote is recreated as before."""
    (tmp_path / "audience-sync.toml").write_text("# mine\n")
    (tmp_path / "audience-sync.db").write_bytes(b"mine")
    refused = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path)])
    assert refused.exit_code == 2
    assert "holds audience-sync.toml, audience-sync.db that the demo did not write" in refused.output
    assert (tmp_path / "audience-sync.toml").read_text() == "# mine\n"
    assert (tmp_path / "audience-sync.db").read_bytes() == b"mine"
