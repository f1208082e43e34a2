"""The status page (part 5 of issue 14) in a real browser: Debian's chromium, headless, driven
by Playwright, against a real daemon. Assertions are on what is rendered (text, element
counts), not on HTML strings."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver
from tests.test_daemon import spawn_args
from tests.test_monitor import monitor_url

CHROMIUM = Path("/usr/bin/chromium")
KEY = "high_value_users"
OTHER = "newsletter"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium from Debian (never a downloaded browser build)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs the chromium package")
        pytest.skip(f"the browser test needs {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


def sync_now(config: Path) -> None:
    result = subprocess.run(
        [*spawn_args(config), "sync"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_the_status_page_shows_every_computation_and_its_runs(
    harness: Harness, receiver: Receiver, browser: Any, tmp_path: Path
) -> None:
    harness.defaults["schedule"] = "1h"  # the daemon's run at start, then nothing for a while
    harness.config_extra = """
[daemon]
http = "127.0.0.1:0"
shutdown_timeout = "10s"

[[audiences]]
name = "Newsletter"
source = "warehouse"
query = "SELECT user_id FROM members WHERE email LIKE 'n%'"
destinations = ["segment"]
"""
    config = harness.write_config()
    # Three manual runs with changes, then the daemon's own run: four runs per computation.
    harness.set_members(["a", "b", ("n1", "n1@example.com")])
    sync_now(config)
    harness.set_members(["a", "b", "c", ("n1", "n1@example.com"), ("n2", "n2@example.com")])
    sync_now(config)
    harness.set_members(["a", "c", "d", "e", ("n1", "n1@example.com")])
    sync_now(config)
    log = tmp_path / "daemon.log"
    daemon = spawn(config, "run", log=log)
    try:
        url = monitor_url(log)
        wait_for(lambda: len([r for r in harness.runs() if r.finished_at]) == 8, 30, "runs")
        page = browser.new_page(viewport={"width": 1400, "height": 600})
        response = page.goto(url)
        assert response.status == 200
        assert page.title() == "audience-sync status"

        rows = page.locator("#computations tbody tr")
        assert rows.count() == 2
        assert [rows.nth(i).get_attribute("data-key") for i in range(2)] == [KEY, OTHER]
        row = page.locator(f'#computations tr[data-key="{KEY}"]')
        assert row.locator("td").first.inner_text().splitlines() == [KEY, "High Value Users"]
        assert row.locator("td.members").inner_text() == "5"  # a, c, d, e, n1
        assert row.locator("td.pending").inner_text() == "0"
        assert "succeeded" in row.locator(".last-run").inner_text()
        assert "UTC" in row.locator(".next-run").inner_text()
        # The chart: a bar of messages sent and a dot of members per run, four runs.
        assert row.locator("svg.chart rect.sent").count() == 4
        assert row.locator("svg.chart circle.members").count() == 4
        assert row.locator("svg.chart polyline.members").count() == 1
        other = page.locator(f'#computations tr[data-key="{OTHER}"]')
        assert other.locator("td.members").inner_text() == "1"
        daemons = page.locator("#daemons li.alive")
        assert daemons.count() == 1 and "(this one)" in daemons.inner_text()
        page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)

        # A computation's own page: its destinations, runs and deliveries.
        row.get_by_role("link", name=KEY).click()
        page.wait_for_url(f"{url}computations/{KEY}")
        assert page.locator("h1").inner_text() == KEY
        destinations = page.locator("#destinations tbody tr")
        assert destinations.count() == 1
        assert destinations.locator("td").first.inner_text() == "segment"
        runs = page.locator("#runs tbody tr")
        assert runs.count() == 4
        assert runs.first.locator("td").nth(1).inner_text() == "schedule"  # newest first
        assert page.locator("#deliveries tbody tr").count() == 4
        assert page.locator("svg.chart rect.sent").count() == 4
        page.get_by_role("link", name="← all computations").click()
        page.wait_for_url(url)
        assert page.locator("#computations tbody tr").count() == 2
        assert page.goto(f"{url}computations/nobody").status == 404
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    assert code == 0, log.read_text()
