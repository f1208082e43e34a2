"""How long `audience-sync --help` and `--version` take, from process start to exit.

    uv run python benchmarks/cli_startup.py [--runs 20]

Runs the installed console script (as a user types it), a few warm-up runs first so the
bytecode cache is built, then ``--runs`` timed runs of each; prints the median and the best, in
seconds. The target (issue 15) is under 0.3 s: the command modules, and with them SQLAlchemy,
Alembic, pydantic, httpx and rich, are imported only when a command runs (sync/cli/base.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 0.3  # issue 15
WARM_UP_RUNS = 3


def _script() -> list[str]:
    beside = Path(sys.executable).with_name("audience-sync")
    found = str(beside) if beside.exists() else shutil.which("audience-sync")
    return [found] if found else [sys.executable, "-m", "sync"]


def time_command(args: list[str], runs: int) -> list[float]:
    """Wall-clock seconds of ``runs`` runs of ``args`` (after the warm-up runs)."""
    for _ in range(WARM_UP_RUNS):
        subprocess.run(args, capture_output=True, check=True)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, capture_output=True, check=True)
        timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    script = _script()
    baseline = time_command([sys.executable, "-c", "pass"], runs)
    print(f"{'command':<28} {'median':>8} {'best':>8}")
    print(f"{'python -c pass':<28} {statistics.median(baseline):>8.3f} {min(baseline):>8.3f}")
    worst = 0.0
    for option in ("--help", "--version"):
        timings = time_command([*script, option], runs)
        median = statistics.median(timings)
        worst = max(worst, median)
        print(f"{'audience-sync ' + option:<28} {median:>8.3f} {min(timings):>8.3f}")
    verdict = "under" if worst < TARGET_SECONDS else "OVER"
    print(f"{verdict} the {TARGET_SECONDS} s target")


if __name__ == "__main__":
    main()
