"""The daemon's heartbeat, metrics, health checks (parts 3 and 4 of issue 14): a real daemon
process against a real receiver, read through `status` and over HTTP as an operator would."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, update

from sync.cli import cli
from sync.config.listen import DEFAULT_HTTP_ADDRESS, parse_listen_address
from sync.monitor import Metrics, MonitorServer, Readiness
from sync.state.tables import DAEMON_SCHEDULES, DAEMONS
from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver

KEY = "high_value_users"
URL_LINE = re.compile(r"status page on (http://\S+/)")


def status(config: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(config), "status", *args])
    assert result.exit_code == 0, result.output
    return result.output


@contextmanager
def serving(harness: Harness) -> Iterator[str]:
    """The daemon's HTTP server on the harness's state DB, on a free port: its base URL."""
    server = MonitorServer(
        parse_listen_address("127.0.0.1:0"),
        config=harness.config(),
        engine=harness.engine,
        metrics=Metrics(),
        readiness=Readiness(lambda: True),
        daemon_id="test",
    )
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def monitor_url(log: Path) -> str:
    """The daemon's HTTP address, from its log line (tests bind port 0, never 9464)."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = URL_LINE.findall(log.read_text())
        return bool(found)

    wait_for(logged, 30, "the daemon to serve HTTP")
    return found[0]


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    response = httpx.get(url + "metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def start_daemon(harness: Harness, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    harness.defaults["schedule"] = "1h"  # one run at start, the next in an hour
    harness.defaults["max_attempts"] = 1
    harness.config_extra = '\n[daemon]\nhttp = "127.0.0.1:0"\nshutdown_timeout = "10s"\n'
    return spawn(harness.write_config(), "run", log=log)


def test_heartbeat_next_runs_metrics_and_health_of_a_running_daemon(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.set_members(["a", "b", "bad"])
    receiver.poison = {"bad"}
    config = harness.write_config()
    assert "no daemon is running" in status(config)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(harness, tmp_path, log)
    try:
        url = monitor_url(log)
        assert parse_listen_address(url.removeprefix("http://").rstrip("/")).port != 9464
        wait_for(lambda: receiver.state.get(("b", KEY)) is True, 30, "the first run")

        # Metrics: the run by status, messages per destination and outcome, the state's
        # gauges (refreshed by the heartbeat the run's end wakes), the duration histogram.
        def counted() -> bool:
            found = samples(url)
            return (
                found.get(
                    ("audience_sync_runs_total", (("computation", KEY), ("status", "partial")))
                )
                == 1
                and (
                    "audience_sync_last_success_timestamp_seconds",
                    (("computation", KEY),),
                )
                not in found  # partial is not a success
                and found.get(
                    (
                        "audience_sync_pending_rows",
                        (("computation", KEY), ("destination", "segment")),
                    )
                )
                == 0
            )

        wait_for(counted, 30, "the run in /metrics")
        found = samples(url)
        message = "audience_sync_messages_total"
        labels = (("computation", KEY), ("destination", "segment"))
        assert found[(message, (*labels, ("outcome", "sent")))] == 2
        assert found[(message, (*labels, ("outcome", "rejected")))] == 1
        assert ("audience_sync_failed_rows", labels) in found
        assert found[("audience_sync_failed_rows", labels)] == 1  # max_attempts 1: given up
        assert found[("audience_sync_members", labels)] == 3
        assert found[("audience_sync_run_duration_seconds_count", (("computation", KEY),))] == 1

        assert httpx.get(url + "healthz", timeout=10).status_code == 200
        ready = httpx.get(url + "readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert "state database: reachable" in ready.text and "scheduler: running" in ready.text

        # status: the daemon is alive, and its next run (in about an hour) is the one shown.
        shown = status(config)
        assert f"daemon running: {socket.gethostname()} pid {daemon.pid}" in shown
        (row,) = json.loads(status(config, "--json"))
        next_run = datetime.fromisoformat(row["next_run"])
        assert timedelta(minutes=55) < next_run - datetime.now(UTC) <= timedelta(hours=1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    assert code == 0, log.read_text()
    # A clean stop removes the daemon's rows: nothing is scheduled any more.
    with harness.engine.connect() as connection:
        assert connection.execute(select(DAEMONS)).all() == []
        assert connection.execute(select(DAEMON_SCHEDULES)).all() == []
    assert "no daemon is running" in status(config)
    assert json.loads(status(config, "--json"))[0]["next_run"] is None


def test_a_killed_daemon_is_reported_dead_once_its_heartbeat_is_old(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.set_members(["a"])
    log = tmp_path / "daemon.log"
    daemon = start_daemon(harness, tmp_path, log)
    config = harness.write_config()
    try:
        monitor_url(log)
        wait_for(lambda: json.loads(status(config, "--json"))[0]["next_run"], 30, "a next run")
    finally:
        daemon.kill()
        daemon.wait(timeout=30)
    # Killed: its row stays, alive until its heartbeat is three beats old. Age it as the
    # state DB's clock will (the heartbeat interval is 10 s; a test does not wait 30 s).
    assert "daemon running" in status(config)
    with harness.engine.begin() as connection:
        (beat,) = connection.execute(select(DAEMONS.c.heartbeat_at)).scalars().all()
        connection.execute(update(DAEMONS).values(heartbeat_at=beat - timedelta(seconds=31)))
    shown = status(config)
    assert "no daemon is running" in shown
    assert f"last seen: {socket.gethostname()} pid {daemon.pid}" in shown
    assert json.loads(status(config, "--json"))[0]["next_run"] is None


def test_readyz_names_what_is_not_ready(tmp_path: Path) -> None:
    # A state DB that refuses connections and a scheduler that stopped: 503, both named.
    engine = create_engine("postgresql+psycopg://nobody:pw@127.0.0.1:1/none")
    server = MonitorServer(
        parse_listen_address("127.0.0.1:0"),
        config=_empty_config(tmp_path),
        engine=engine,
        metrics=Metrics(),
        readiness=Readiness(lambda: False),
        daemon_id="test",
    )
    server.start()
    try:
        ready = httpx.get(server.url + "readyz", timeout=10)
        assert ready.status_code == 503
        assert "state database: unreachable" in ready.text
        assert "scheduler: not running" in ready.text
        assert "pw" not in ready.text.replace("not ready", "")
        assert httpx.get(server.url + "healthz", timeout=10).status_code == 200
        assert httpx.get(server.url + "nowhere", timeout=10).status_code == 404
    finally:
        server.stop()
        engine.dispose()


def test_an_address_in_use_leaves_the_daemon_running_without_http(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    from sync.scheduler import Daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        harness.config_extra = f'\n[daemon]\nhttp = "127.0.0.1:{port}"\n'
        daemon = Daemon(harness.config(), harness.engine)
        assert daemon.start_monitor() is None
    assert f"cannot serve metrics and the status page on 127.0.0.1:{port}" in caplog.text


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("false", ""), ('""', ""), ("true", DEFAULT_HTTP_ADDRESS), ('"[::1]:9100"', "[::1]:9100")],
)
def test_the_http_setting(tmp_path: Path, setting: str, expected: str) -> None:
    from sync.config import parse_config

    config = parse_config(f"[daemon]\nhttp = {setting}\n", "t.toml", tmp_path, {})
    assert config.daemon.http == expected
    assert parse_config("", "t.toml", tmp_path, {}).daemon.http == "127.0.0.1:9464"


def test_a_bad_http_setting_is_a_config_error(tmp_path: Path) -> None:
    from sync.config import parse_config
    from sync.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config('[daemon]\nhttp = "9464"\n', "t.toml", tmp_path, {})
    assert 'daemon.http: not an address to listen on: "9464"' in str(caught.value)


def _empty_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    from sync.config import parse_config

    return parse_config("", "t.toml", tmp_path, {})


def test_recent_runs_and_the_pages_on_every_state_db(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    from sync.state.monitoring import recent_runs

    harness.set_members(["a", "b"])
    harness.sync()
    harness.set_members(["a", "b", "c"])
    harness.sync()
    harness.destinations["segment"]["write_key"] = (
        "wrong"  # 401: the run fails; its member count is no audience size
    )
    harness.set_members(["a", "b", "c", "d"])
    failed = harness.sync()
    assert failed.status == "failed"
    with harness.engine.connect() as connection:
        series = recent_runs(connection, 2)
        assert list(series) == [KEY]
        assert [(p.status, p.members, p.sent) for p in series[KEY]] == [
            ("succeeded", 3, 1),
            ("failed", None, 0),
        ]
        assert [p.run_id for p in recent_runs(connection, 5, KEY)[KEY]] == [1, 2, 3]
        assert recent_runs(connection, 5, "nobody") == {}
    with serving(harness) as url:
        for path, expected in [("", 200), (f"computations/{KEY}", 200), ("computations/x", 404)]:
            response = httpx.get(url + path, timeout=10)
            assert response.status_code == expected, response.text
            assert "wrong" not in response.text


def test_a_run_refused_before_it_starts_counts_as_failed(
    harness: Harness, receiver: Receiver
) -> None:
    from sync.scheduler import Daemon

    harness.set_members(["a"])
    assert harness.sync().status == "succeeded"
    # The endpoint moved under the same destination name: refused until `sync --full`.
    harness.destinations["segment"]["endpoint"] = receiver.url + "/elsewhere"
    config = harness.config()
    daemon = Daemon(config, harness.engine)
    assert daemon.run_audience(config.audiences[0]) is None
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(daemon.metrics.exposition().decode())
        for s in family.samples
    }
    assert found[("audience_sync_runs_total", (("computation", KEY), ("status", "failed")))] == 1


def test_the_pages_and_retire_call_a_trait_group_a_trait_group(
    harness: Harness, receiver: Receiver
) -> None:
    """The status page said "audience" for every computation (hostile review)."""
    harness.warehouse_sql(
        "CREATE TABLE t (user_id TEXT, plan TEXT)", "INSERT INTO t VALUES ('u1', 'pro')"
    )
    harness.config_extra = (
        '[[traits]]\nname = "Plans"\nsource = "warehouse"\nquery = "SELECT * FROM t"\n'
        'destinations = ["segment"]\n'
    )
    assert harness.sync_named("Plans").status == "succeeded"
    with serving(harness) as url:
        overview = httpx.get(url, timeout=10).text
        row = re.search(r'data-key="plans".*?</tr>', overview, re.S)
        assert row is not None and "<td>trait group</td>" in row.group(0), overview
        page = httpx.get(url + "computations/plans", timeout=10).text
        assert "<p>trait group Plans" in page, page
    config = harness.write_config()
    rows = json.loads(status(config, "--json"))
    assert {r["key"]: r["kind"] for r in rows}["plans"] == "trait"
    harness.config_extra = ""
    retired = CliRunner().invoke(cli, ["--config", str(harness.write_config()), "retire", "plans"])
    assert retired.exit_code == 0, retired.output
    assert retired.output.startswith("trait group plans retired"), retired.output
