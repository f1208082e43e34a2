"""The benchmark at 10,000 members, so it cannot rot (timings are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--members", "10000",
         "--repeat", "1", "--memory", "10000", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {
        "floor-load-diff", "floor-send", "receiver", "plan-first", "plan-delta", "deliver", "end-to-end",
        "trait-first", "trait-delta", "peer-default", "peer-tuned",
    }
    assert all(row["median"] > 0 for row in results["scenarios"].values())
    assert {(m["phase"], m["members"]) for m in results["memory"]} == {("plan", 10000), ("deliver", 10000)}
    assert "members/s" in result.stdout and "peer-tuned" in result.stdout


def test_ledger_writes_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/ledger_writes.py on 2,000 rows: both variants acknowledge every row (the
    script asserts it) and are reported."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ledger_writes.py"), "--members", "2000",
         "--repeat", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "2,000 acknowledgements" in lines[0]
    assert [line.split("  ")[1].strip() for line in lines[1:-1]] == ["ack", "ack + ledger"]
    assert "building the ledger rows in Python" in lines[-1]
