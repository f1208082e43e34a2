"""Structured logs as a user gets them from the command line: JSON fields of their own (run id
as an integer, audience, destination, status, counts, duration), RFC 3339 times with
milliseconds, the fatal error as JSON too; human lines that name the run once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness import Harness
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _run(config: Path, *args: str, fmt: str = "json") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sync",
            "--config",
            str(config),
            "--log-level",
            "INFO",
            "--log-format",
            fmt,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _records(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    return [json.loads(line) for line in lines]  # every line is JSON


def test_json_logs_have_fields_of_their_own(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b", "c"])
    receiver.script = [Scripted(503)]  # one retry warning, naming its destination
    result = _run(harness.write_config(), "sync")
    assert result.returncode == 0, result.stderr
    records = _records(result.stderr)
    for record in records:
        assert RFC3339_MS.match(record["time"]), record["time"]
        assert {"level", "logger", "message"} <= set(record)
    [summary] = [r for r in records if r.get("status") == "succeeded"]
    assert summary["run_id"] == 1 and isinstance(summary["run_id"], int)
    assert summary["audience"] == KEY and summary["destination"] == "segment"
    assert (summary["members"], summary["added"], summary["sent"]) == (3, 3, 3)
    assert summary["removed"] == 0 and summary["invalid"] == 0
    assert isinstance(summary["duration_ms"], int) and summary["duration_ms"] >= 0
    assert summary["destinations"] == [
        {
            "destination": "segment",
            "added": 3,
            "removed": 0,
            "changed": 0,
            "sent": 3,
            "rejected": 0,
            "failed": 0,
            "left_pending": 0,
        }
    ]
    [retry] = [r for r in records if r["level"] == "WARNING" and "retry 1" in r["message"]]
    assert retry["destination"] == "segment" and retry["run_id"] == 1
    assert retry["audience"] == KEY


def test_human_lines_name_the_run_once(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a"])
    result = _run(harness.write_config(), "sync", fmt="human")
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "succeeded" in x]
    assert re.match(
        rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z INFO    \[run 1 {KEY}\] succeeded: 1 members",
        line,
    ), line
    assert line.count("run 1") == 1 and line.count(KEY) == 1, line


def test_a_fatal_error_is_json_in_json_mode(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[state]\nurl = "sqlite:///s.db"\n[[audiences]]\nname = "x"\n')
    result = _run(config, "sync")
    assert result.returncode == 2
    [record] = _records(result.stderr)
    assert record["level"] == "ERROR" and record["exit_code"] == 2
    assert "audiences[0]" in record["message"] and RFC3339_MS.match(record["time"])
    assert not (tmp_path / "s.db").exists()

    usage = _run(config, "sync", "--no-such-option")
    assert usage.returncode == 2
    [record] = _records(usage.stderr)
    assert "--no-such-option" in record["message"]

    human = _run(config, "sync", fmt="human")
    assert human.returncode == 2 and human.stderr.startswith("Error: ")
