"""Alerts ([alerts.NAME]) against real local receivers, through the CLI, the Syncer and the
daemon as a user runs them, on every state database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select, update

from sync.cli import cli
from sync.errors import ConfigError
from sync.scheduler import Daemon
from sync.state.alerts import claim_alert
from sync.state.db import make_state_engine
from sync.state.tables import ALERTS_SENT
from tests.harness import Harness, _toml
from tests.receiver import Receiver
from tests.test_secrets import dump_state

BROKEN_QUERY = "SELECT user_id FROM no_such_table"
GOOD_QUERY = "SELECT user_id, email FROM members"


@pytest.fixture
def alert_receiver() -> Iterator[Receiver]:
    """A second real receiver on 127.0.0.1 that takes the alerts (any path, answers 200)."""
    with Receiver().running() as running:
        yield running


def add_alert(harness: Harness, name: str, **settings: Any) -> None:
    lines = [f"\n[alerts.{name}]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
    harness.config_extra += "\n".join(lines) + "\n"


def bodies(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    return [r.body for r in list(receiver.requests) if r.path == path]


def closed_port_url() -> str:
    """A URL nothing listens on (the port was bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sync_cli(path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(cli, ["--config", str(path), *args, "sync"])


def alerts_sent(engine: Engine) -> set[tuple[str, str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(select(ALERTS_SENT)).all()
    return {(r.alert, r.computation, r.event) for r in rows}


def age_alerts(engine: Engine, hours: float) -> None:
    """Pretend the alerts were sent ``hours`` ago (the repeat interval passed)."""
    with engine.begin() as connection:
        connection.execute(
            update(ALERTS_SENT).values(sent_at=datetime.now(UTC) - timedelta(hours=hours))
        )


def test_failed_alerts_once_per_interval_then_recovered_then_failed_at_once(
    harness: Harness, receiver: Receiver, alert_receiver: Receiver
) -> None:
    harness.set_members(["a", "b"])
    add_alert(harness, "ops", type="webhook", url=f"{alert_receiver.url}/hook", repeat="1h")
    add_alert(harness, "team", type="slack", url=f"{alert_receiver.url}/slack")
    harness.audience["query"] = BROKEN_QUERY
    path = harness.write_config()

    result = sync_cli(path)
    assert result.exit_code == 1, result.output
    (run,) = harness.runs()
    (hook,) = bodies(alert_receiver, "/hook")
    assert hook["alert"] == "ops" and hook["event"] == "failed"
    assert hook["computation"] == {
        "name": "High Value Users",
        "key": "high_value_users",
        "kind": "audience",
    }
    assert hook["run"]["id"] == run.id and hook["run"]["status"] == "failed"
    assert "no_such_table" in hook["run"]["error"] and hook["run"]["error"] == run.error
    (slack,) = bodies(alert_receiver, "/slack")
    assert list(slack) == ["text"]  # Slack's incoming-webhook JSON
    assert slack["text"].startswith('audience-sync: audience "High Value Users"')
    assert f"failed: run {run.id}" in slack["text"] and "no_such_table" in slack["text"]
    assert slack["text"] == hook["text"]

    # Failing again within the interval: recorded, not alerted.
    assert sync_cli(path).exit_code == 1
    assert len(harness.runs()) == 2 and len(alert_receiver.requests) == 2
    # Once the interval has passed, it alerts again.
    age_alerts(harness.engine, 2)
    assert sync_cli(path).exit_code == 1
    assert len(bodies(alert_receiver, "/hook")) == 2 and len(bodies(alert_receiver, "/slack")) == 2

    harness.audience["query"] = GOOD_QUERY
    harness.write_config()
    assert sync_cli(path).exit_code == 0
    recovered = bodies(alert_receiver, "/hook")[-1]
    assert recovered["event"] == "recovered" and recovered["run"]["status"] == "succeeded"
    assert recovered["run"]["previous_status"] == "failed"
    assert "recovered" in bodies(alert_receiver, "/slack")[-1]["text"]
    assert alerts_sent(harness.engine) == set()
    # A success after a success says nothing.
    assert sync_cli(path).exit_code == 0
    assert len(alert_receiver.requests) == 6

    # Recovered, the next failure is a new incident: alerted at once, whatever the interval.
    harness.audience["query"] = BROKEN_QUERY
    harness.write_config()
    assert sync_cli(path).exit_code == 1
    assert [b["event"] for b in bodies(alert_receiver, "/hook")] == [
        "failed",
        "failed",
        "recovered",
        "failed",
    ]


def test_guarded_and_failed_alert_the_computations_and_events_each_alert_names(
    harness: Harness, receiver: Receiver, alert_receiver: Receiver
) -> None:
    harness.defaults["guard_min_members"] = 2
    harness.set_members(["a", "b", "c", "d"])
    harness.config_extra = """
[[traits]]
name = "Plans"
source = "warehouse"
query = "SELECT user_id, email AS plan FROM members"
destinations = ["segment"]
"""
    url = alert_receiver.url
    add_alert(harness, "removals", type="webhook", url=f"{url}/removals", on=["guarded"])
    # Filters by a key (an audience's) and by a name (a trait group's).
    add_alert(
        harness,
        "traits",
        type="webhook",
        url=f"{url}/traits",
        on=["failed", "recovered"],
        audiences=["Plans"],
    )
    assert harness.sync().status == "succeeded"
    assert harness.sync_named("Plans").status == "succeeded"
    assert alert_receiver.requests == []  # nothing went wrong, nothing recovered

    harness.set_members(["a"])  # an unusual removal: 3 of 4
    report = harness.sync()
    assert report.status == "guarded"
    (guarded,) = bodies(alert_receiver, "/removals")
    assert guarded["event"] == "guarded" and guarded["computation"]["key"] == "high_value_users"
    assert "would remove 3 of 4 members" in guarded["text"]
    assert bodies(alert_receiver, "/traits") == []  # not its computation

    harness.warehouse_sql("ALTER TABLE members RENAME TO gone")
    assert harness.sync_named("Plans").status == "failed"
    assert harness.sync(force=True).status == "failed"
    (failed,) = bodies(alert_receiver, "/traits")
    assert failed["event"] == "failed" and failed["computation"] == {
        "name": "Plans",
        "key": "plans",
        "kind": "trait",
    }
    assert len(bodies(alert_receiver, "/removals")) == 1  # `on` has no "failed"

    harness.warehouse_sql("ALTER TABLE gone RENAME TO members")
    harness.set_members(["a", "b", "c", "d"])
    assert harness.sync_named("Plans").status == "succeeded"
    assert [b["event"] for b in bodies(alert_receiver, "/traits")] == ["failed", "recovered"]
    assert len(bodies(alert_receiver, "/removals")) == 1


def test_the_daemon_alerts_a_partial_run_and_its_sweep_recovering(
    harness: Harness, receiver: Receiver, alert_receiver: Receiver
) -> None:
    harness.defaults["delivery_time_budget"] = "300ms"
    harness.set_members(["a", "b"])
    add_alert(harness, "ops", type="slack", url=f"{alert_receiver.url}/slack")
    receiver.forced = "503"  # the destination is down: rows stay pending
    with Daemon(harness.config(), harness.engine) as daemon:
        daemon.run_once()  # its exit code for a partial run is the CLI's business
        assert harness.runs()[-1].status == "partial"
        (partial,) = bodies(alert_receiver, "/slack")
        assert "was partial" in partial["text"] and "2 left pending" in partial["text"]

        receiver.forced = None
        deadline = time.monotonic() + 20
        while harness.runs()[-1].trigger != "sweep":  # the leftovers' backoff expires
            assert time.monotonic() < deadline, "no sweep ran"
            daemon.sweep()
    assert harness.runs()[-1].status == "succeeded"
    recovered = bodies(alert_receiver, "/slack")[-1]["text"]
    assert "recovered" in recovered and "after a partial run" in recovered
    assert len(alert_receiver.requests) == 2


def test_a_receiver_down_or_slow_leaves_the_sync_alone(
    harness: Harness, receiver: Receiver, alert_receiver: Receiver
) -> None:
    token = "alert_SECRET_token_42"
    down = f"{closed_port_url()}/services/{token}"
    add_alert(harness, "down", type="slack", url="${ALERT_URL}")
    add_alert(harness, "slow", type="webhook", url=f"{alert_receiver.url}/{token}", timeout="300ms")
    harness.set_members(["a", "b"])
    harness.audience["query"] = BROKEN_QUERY
    path = harness.write_config()
    gate = alert_receiver.gate = threading.Event()  # holds every alert until set
    try:
        started = time.monotonic()
        result = sync_cli(path, env={"ALERT_URL": down})
        assert time.monotonic() - started < 15
    finally:
        gate.set()
    assert result.exit_code == 1 and "no_such_table" in result.output
    assert harness.runs()[-1].status == "failed"
    lines = [line for line in result.stderr.splitlines() if "alert" in line]
    assert any(
        'alert "down": could not send the failed alert for audience "high_value_users": '
        "cannot reach the receiver" in line
        for line in lines
    ), result.stderr
    assert any(
        'alert "slow": could not send the failed alert for audience "high_value_users": '
        "no answer within 0.3s" in line
        for line in lines
    ), result.stderr
    assert token not in result.output + result.stderr
    # Neither alert counts as sent: the next run tries them again.
    assert alerts_sent(harness.engine) == set()

    # A successful sync is as successful with its recovery alert undeliverable.
    alert_receiver.gate = None
    harness.audience["query"] = GOOD_QUERY
    harness.write_config()
    result = sync_cli(path, env={"ALERT_URL": down})
    assert result.exit_code == 0, result.output
    assert {d.message_id for d in receiver.deliveries} and harness.runs()[-1].status == "succeeded"
    assert 'alert "down": could not send the recovered alert' in result.stderr
    assert [b["event"] for b in bodies(alert_receiver, f"/{token}")] == ["failed", "recovered"]
    assert token not in result.output + result.stderr + dump_state(harness.engine)


def test_processes_sharing_a_state_database_alert_once(
    harness: Harness, receiver: Receiver, alert_receiver: Receiver
) -> None:
    add_alert(harness, "ops", type="webhook", url=f"{alert_receiver.url}/hook")
    harness.audience["query"] = BROKEN_QUERY
    harness.set_members(["a"])
    other = make_state_engine(harness.engine.url.render_as_string(hide_password=False))
    try:
        from sync.engine import Syncer

        config = harness.config()
        for engine in (other, harness.engine, other):
            assert Syncer(config, engine).sync(config.audiences[0]).status == "failed"
    finally:
        other.dispose()
    assert len(harness.runs()) == 3
    assert [b["event"] for b in bodies(alert_receiver, "/hook")] == ["failed"]


def test_concurrent_claims_of_one_alert_let_one_through(state_engine: Engine) -> None:
    engines = [state_engine, make_state_engine(state_engine.url.render_as_string(False))]
    barrier = threading.Barrier(2)
    claims: list[datetime | None] = []

    def claim(engine: Engine) -> None:
        barrier.wait(timeout=10)
        with engine.begin() as connection:
            claims.append(claim_alert(connection, "ops", "vip", "failed", 3600))

    try:
        threads = [threading.Thread(target=claim, args=(e,)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        engines[1].dispose()
    assert len(claims) == 2 and sum(c is not None for c in claims) == 1


def test_alert_settings_are_validated_and_the_url_is_a_secret(harness: Harness) -> None:
    add_alert(harness, "team", type="slack", url="https://hooks.example.com/services/T1/B2/XyZ")
    config = harness.config()
    assert "https://hooks.example.com/services/T1/B2/XyZ" in config.secrets()
    alert = config.alerts["team"]
    assert alert.on == ["failed", "guarded", "partial", "recovered"] and alert.repeat == 3600

    harness.config_extra = ""
    add_alert(
        harness,
        "bad",
        type="email",
        url="ftp://hooks.example.com/T1/B2/XyZ",
        on=["failed", "exploded"],
        audiences=["High Value Userz"],
        repeat="sometimes",
    )
    with pytest.raises(ConfigError) as raised:
        harness.config()
    text = str(raised.value)
    for expected in (
        "alerts.bad.type",
        "alerts.bad.url",
        "alerts.bad.on[1]",
        "alerts.bad.repeat",
        'alerts.bad.audiences[0]: no audience or trait group named "High Value Userz"; did you '
        'mean "High Value Users"?',
    ):
        assert expected in text, text
    assert "T1/B2/XyZ" not in text
