"""retry, retire, key reuse, logs (run ids, JSON, no secrets) and the daemon's schema check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from sync.cli import cli
from sync.delivery import DeliveryHooks
from sync.engine import RunHooks
from sync.errors import AudienceSyncError
from sync.state.tables import AUDIENCES, DELIVERY_PROGRESS, MEMBERSHIPS
from tests.harness import WRITE_KEY, Harness
from tests.processes import wait_for
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"


def invoke(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    return result.exit_code, result.output


def test_retry_requeues_failed_rows(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["max_attempts"] = 1
    harness.set_members(["ok", "bad"])
    receiver.poison = {"bad"}
    harness.sync()
    assert harness.memberships()["bad"].status == "failed"
    config = harness.write_config()
    code, output = invoke(config, "retry", KEY)
    assert code == 0 and "1 failed row(s)" in output
    assert harness.memberships()["bad"].status == "pending"
    receiver.poison = set()
    harness.sync()
    assert harness.memberships()["bad"].synced_value == "true"


def test_retire_with_send_false_keeps_the_key_reserved(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "b"])
    harness.sync()
    config = harness.write_config()
    code, output = invoke(config, "retire", KEY)
    assert code == 1 and "still in the config" in output
    harness.audience["name"] = "Something Else"
    config = harness.write_config()
    receiver.reset()
    code, output = invoke(config, "retire", KEY, "--send-false")
    assert code == 0, output
    assert "retired after sending 2 false value(s)" in output
    assert {m["userId"]: m["traits"][KEY] for m in receiver.messages()} == {"a": False, "b": False}
    with harness.engine.connect() as connection:
        assert connection.execute(select(AUDIENCES.c.retired_at)).scalar() is not None
    code, output = invoke(config, "status", "--json")
    assert {r["key"]: r["state"] for r in json.loads(output)}[KEY] == "retired"
    # The key stays reserved: a new audience that derives it is refused...
    harness.audience["name"] = "High Value Users"
    with pytest.raises(
        AudienceSyncError, match=r"belonged to the retired audience .*allow_key_reuse"
    ):
        harness.sync()
    # ...unless it says so.
    harness.audience["allow_key_reuse"] = True
    assert harness.sync().status == "succeeded"


def test_a_lost_response_keeps_the_member_in_doubt(harness: Harness, receiver: Receiver) -> None:
    """The receiver applies the batch but answers too late: the client cannot know."""
    harness.destinations["segment"]["timeout"] = 0.3
    harness.defaults["delivery_time_budget"] = "200ms"
    harness.set_members(["flaky"])
    receiver.delay = 0.6
    assert harness.sync().status == "partial"
    row = harness.memberships()["flaky"]
    assert row.in_doubt is True and row.synced_value is None
    # The receiver applies the late batch before the member leaves (in arrival order: a
    # `false` overtaking the late `true` is the documented timeout window, not this case).
    wait_for(lambda: ("flaky", KEY) in receiver.state, 10, "the late batch to be applied")
    receiver.delay = 0
    harness.set_members([])
    with harness.engine.begin() as connection:
        connection.execute(MEMBERSHIPS.update().values(next_attempt_at=None))
    harness.sync()
    # It entered and left before any acknowledgement, but the destination may hold `true`.
    assert receiver.state[("flaky", KEY)] is False
    assert harness.memberships()["flaky"].in_doubt is False


class Killed(BaseException):
    """The process dies here (no handler runs)."""


def test_a_crash_after_sending_is_recovered_before_the_next_plan(
    harness: Harness, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination took the batch; the process died before recording anything."""

    def die() -> None:
        raise Killed

    harness.hooks = RunHooks(delivery=DeliveryHooks(after_send=die))
    harness.set_members(["gone", "stays"])
    with pytest.raises(Killed):
        harness.sync()
    assert receiver.state[("gone", KEY)] is True
    assert harness.memberships()["gone"].synced_value is None
    with harness.engine.connect() as connection:
        progress = connection.execute(select(DELIVERY_PROGRESS.c.through_member)).all()
    assert progress == [("stays",)]  # how far the dead delivery handed rows over
    harness.hooks = RunHooks()
    harness.set_members(["stays"])
    assert harness.sync().status == "succeeded"
    # It entered and left without an acknowledgement; the destination holds `true`.
    assert receiver.state[("gone", KEY)] is False
    assert receiver.state[("stays", KEY)] is True
    with harness.engine.connect() as connection:
        assert connection.execute(select(DELIVERY_PROGRESS)).all() == []


def test_a_refused_batch_is_not_in_doubt(harness: Harness, receiver: Receiver) -> None:
    """A 429 refuses the batch before processing it (a 5xx does not say: see
    test_delivery_faults.py::test_a_5xx_after_the_batch_was_applied_leaves_it_in_doubt)."""
    harness.defaults["delivery_time_budget"] = "50ms"
    harness.set_members(["x"])
    receiver.script = [Scripted(429)] * 20
    harness.sync()
    assert harness.memberships()["x"].in_doubt is False


def test_logs_carry_run_ids_and_never_secrets(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    hook_secret = "whsec_do_not_log_42"
    db_password = "pw_never_in_logs_7"
    harness.destinations["hook"] = {
        "type": "webhook",
        "url": f"{receiver.url}/hook",
        "secret": hook_secret,
    }
    harness.audience["destinations"] = ["segment", "hook"]
    state = make_url(harness.engine.url.render_as_string(hide_password=False))
    if state.get_backend_name() == "postgresql":
        # Trust auth accepts any password: put one in the state URL.
        state_url = state.set(password=db_password).render_as_string(hide_password=False)
    else:
        state_url = str(state)
    config = (
        harness.write_config()
        .read_text()
        .replace(harness.engine.url.render_as_string(hide_password=False), state_url)
    )
    # A source URL with a password that fails to connect, so the URL reaches an error message.
    config += f"""
[sources.remote]
url = "postgresql+psycopg://reader:{db_password}@127.0.0.1:1/warehouse"

[[audiences]]
name = "Remote"
source = "remote"
query = "SELECT user_id FROM t"
destinations = ["segment"]
"""
    path = tmp_path / "secrets.toml"
    path.write_text(config.replace(WRITE_KEY, "${TEST_WRITE_KEY}"))
    receiver.script = [Scripted(503), Scripted(401, body='{"error": "bad key"}')]
    harness.set_members(["a", "b"])
    env = {"PATH": "/usr/bin:/bin", "TEST_WRITE_KEY": WRITE_KEY}
    outputs = []
    for fmt in ("human", "json"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sync",
                "--config",
                str(path),
                "--log-level",
                "DEBUG",
                "--log-format",
                fmt,
                "sync",
                "--full",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        outputs.append(result.stdout + result.stderr)
    human, as_json = outputs
    for text_ in outputs:
        assert WRITE_KEY not in text_ and hook_secret not in text_ and db_password not in text_
    assert "[run 1 high_value_users]" in human and "retry 1" in human
    records = [json.loads(line) for line in as_json.splitlines() if line.startswith("{")]
    assert any(isinstance(r.get("run_id"), int) and r.get("audience") == KEY for r in records), (
        records
    )
    # Nor in the state DB.
    with harness.engine.connect() as connection:
        for table in ("runs", "run_deliveries", "memberships", "audiences"):
            dump = str(connection.execute(text(f"SELECT * FROM {table}")).all())
            assert WRITE_KEY not in dump and hook_secret not in dump and db_password not in dump


def test_daemon_checks_the_schema_at_start(tmp_path: Path, state_url: str) -> None:
    from sync.state.db import make_state_engine

    engine = make_state_engine(state_url)
    try:
        harness = Harness(tmp_path, engine)
        config = harness.write_config()
        code, output = invoke(config, "run", "--once")
        assert code == 1 and "run `audience-sync db upgrade`" in output
        harness.config_extra = ""
        config.write_text(
            config.read_text().replace(
                "[sources.warehouse]", "auto_upgrade = true\n[sources.warehouse]"
            )
        )
        harness.set_members([])
        code, output = invoke(config, "run", "--once")
        assert code == 0, output
    finally:
        engine.dispose()


def test_the_log_filter_redacts_secrets_and_url_passwords(capsys) -> None:
    import logging

    from sync.logs import configure_logging

    configure_logging("DEBUG", "human", secrets=["wk_live_abcdef"])
    try:
        raise ValueError("bad key wk_live_abcdef")
    except ValueError:
        logging.getLogger("sync.test").exception(
            "connecting to %s with %s", "postgresql://u:s3cretpw@db/x", "wk_live_abcdef"
        )
    err = capsys.readouterr().err
    assert "wk_live_abcdef" not in err and "s3cretpw" not in err
    assert "postgresql://u:***@db/x" in err and err.count("***") >= 3
