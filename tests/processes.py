"""Helpers to run audience-sync as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def spawn(config: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``audience-sync --config CONFIG ARGS`` with stdout and stderr going to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_CONFIG")}
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "sync", "--config", str(config), *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
