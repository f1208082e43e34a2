"""`check --probe`, as a user runs it: queries run with no row fetched, keys checked against the
state DB, every HTTP destination sent a request that changes nothing (real local receivers)."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sync.cli import cli
from tests.receiver import Receiver

WRITE_KEY = "wk_probe_secret_42"


def _config(
    tmp_path: Path,
    state_url: str,
    *,
    audiences: str,
    destinations: str = '[destinations.preview]\ntype = "file"\npath = "out.jsonl"\n',
) -> Path:
    with sqlite3.connect(tmp_path / "warehouse.db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS users (user_id TEXT, email TEXT, spend REAL)")
        db.execute("INSERT INTO users VALUES ('u1', 'u1@example.com', 10.5)")
    db.close()
    path = tmp_path / "audience-sync.toml"
    path.write_text(
        f'[state]\nurl = "{state_url}"\n\n[sources.warehouse]\nurl = "sqlite:///warehouse.db"\n\n'
        f"{destinations}\n{audiences}"
    )
    return path


def _audience(name: str, query: str, destination: str = "preview", kind: str = "audiences") -> str:
    return (
        f'[[{kind}]]\nname = "{name}"\nsource = "warehouse"\nquery = """{query}"""\n'
        f'destinations = ["{destination}"]\n'
    )


def _check(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["--config", str(config), "check", *extra, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def test_probe_finds_column_problems_that_plain_check_misses(tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    audiences = (
        _audience("Good", "SELECT user_id, email FROM users -- a trailing comment")
        + _audience("No Ids", "SELECT email FROM users;")
        + _audience("Typo", "SELECT user_idd FROM users")
        + "traits = []\n"
        + _audience("Spend", 'SELECT user_id, spend AS "Total Spend" FROM users', kind="traits")
        + _audience("Stats", "SELECT user_id, spend FROM users", kind="traits")
    )
    config = _config(tmp_path, state, audiences=audiences)
    code, report = _check(config)
    assert code == 0 and "probe" not in report  # plain check does not run queries

    code, report = _check(config, "--probe")
    assert code == 1 and report["ok"] is False
    found = {q["key"]: q for q in report["probe"]["queries"]}
    assert found["good"]["ok"] and found["good"]["columns"] == ["user_id", "email"]
    assert not found["no_ids"]["ok"] and "needs a user_id column" in found["no_ids"]["detail"]
    assert not found["typo"]["ok"] and "no such column: user_idd" in found["typo"]["detail"]
    assert not found["spend"]["ok"]
    assert 'column "Total Spend" cannot be a trait key' in found["spend"]["detail"]
    assert "AS total_spend" in found["spend"]["detail"]
    assert found["stats"]["ok"] and found["stats"]["detail"] == "columns ok; traits spend"
    assert not (tmp_path / "state.db").exists(), "check --probe must not create the state DB"

    human = CliRunner().invoke(cli, ["--config", str(config), "check", "--probe"])
    assert human.exit_code == 1
    assert "Probe (nothing fetched, nothing sent)" in human.output
    assert "no such column: user_idd" in " ".join(human.output.split())


def test_probe_refuses_a_retired_key(tmp_path: Path, state_url: str) -> None:
    runner = CliRunner()
    old = _audience("Old Buyers", "SELECT user_id FROM users")
    config = _config(tmp_path, state_url, audiences=old)
    assert runner.invoke(cli, ["--config", str(config), "db", "upgrade"]).exit_code == 0
    result = runner.invoke(cli, ["--config", str(config), "sync"])
    assert result.exit_code == 0, result.output
    other = _audience("Someone Else", "SELECT user_id, email FROM users")
    config = _config(tmp_path, state_url, audiences=other)
    result = runner.invoke(cli, ["--config", str(config), "retire", "old_buyers"])
    assert result.exit_code == 0, result.output

    # A new audience that derives the retired key: a sync would refuse it; so does the probe.
    again = _audience("Old  Buyers!", "SELECT user_id FROM users")
    config = _config(tmp_path, state_url, audiences=again)
    code, report = _check(config, "--probe")
    assert code == 1
    [probe] = report["probe"]["queries"]
    assert probe["key"] == "old_buyers" and not probe["ok"]
    assert 'the key "old_buyers" belonged to the retired audience' in probe["detail"]
    sync = runner.invoke(cli, ["--config", str(config), "sync"])
    assert sync.exit_code == 1 and "belonged to the retired audience" in sync.output

    allowed = again + "allow_key_reuse = true\n"
    config = _config(tmp_path, state_url, audiences=allowed)
    code, report = _check(config, "--probe")
    assert code == 0, report


def _http_destinations(receiver_url: str, webhook_url: str) -> str:
    return (
        f'[destinations.segment]\ntype = "segment"\nwrite_key = "{WRITE_KEY}"\n'
        f'endpoint = "{receiver_url}"\n'
        f'[destinations.hook]\ntype = "webhook"\nurl = "{webhook_url}/hook"\n'
        'secret = "hook_secret_77"\n'
    )


def test_probe_contacts_each_destination_without_changing_anything(tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    with (
        Receiver(write_key=WRITE_KEY).running() as segment,
        Receiver().running() as hook,
    ):
        config = _config(
            tmp_path,
            state,
            audiences=_audience("Good", "SELECT user_id FROM users", destination="segment"),
            destinations=_http_destinations(segment.url, hook.url),
        )
        code, report = _check(config, "--probe")
        assert code == 0, report
        found = {d["destination"]: d for d in report["probe"]["destinations"]}
        assert found["segment"]["verdict"] == "ok"
        assert found["segment"]["url"] == f"{segment.url}/v1/batch"
        assert found["hook"]["verdict"] == "ok"
        # One request each, an empty batch: nothing applied at either.
        for receiver in (segment, hook):
            [request] = receiver.requests
            assert request.body["batch"] == []
            assert receiver.messages() == []
        assert hook.requests[0].headers["x-audience-sync-signature"].startswith("sha256=")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_reports_auth_tls_dns_and_refused_per_destination(tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    with Receiver(write_key="another_key").running() as segment:
        destinations = (
            _http_destinations(segment.url, f"http://127.0.0.1:{_closed_port()}")
            + f'[destinations.tls]\ntype = "segment"\nwrite_key = "k"\n'
            f'endpoint = "{segment.url.replace("http:", "https:")}"\n'
            '[destinations.dns]\ntype = "webhook"\nurl = "https://no-such-host.invalid/x"\n'
        )
        config = _config(
            tmp_path,
            state,
            audiences=_audience("Good", "SELECT user_id FROM users", destination="segment"),
            destinations=destinations,
        )
        code, report = _check(config, "--probe")
        human = CliRunner().invoke(cli, ["--config", str(config), "check", "--probe"])
    assert code == 1
    found = {d["destination"]: d for d in report["probe"]["destinations"]}
    assert found["segment"]["verdict"] == "auth" and "HTTP 401" in found["segment"]["detail"]
    assert found["hook"]["verdict"] == "connect"
    assert found["tls"]["verdict"] == "tls", found["tls"]
    assert found["dns"]["verdict"] == "dns", found["dns"]
    assert all(not d["ok"] for d in found.values())
    assert WRITE_KEY not in human.output and "hook_secret_77" not in human.output
    assert human.exit_code == 1 and "auth: " in human.output


def test_check_warns_when_the_daemon_could_exhaust_the_servers_connections(
    tmp_path: Path, state_url: str
) -> None:
    """Each delivery worker holds a state DB connection: 64 daemon workers of concurrency 64
    need more than a server allows (4,291 connections), and `check` says so before runs fail
    on "too many clients"; the defaults fit (and SQLite has no such limit)."""
    destinations = (
        f'[destinations.segment]\ntype = "segment"\nwrite_key = "{WRITE_KEY}"\n'
        'endpoint = "http://127.0.0.1:9"\nspace_id = "spa_1"\n'
    )
    audiences = "".join(
        _audience(f"A{i}", "SELECT user_id FROM users", destination="segment") for i in range(64)
    )
    config = _config(tmp_path, state_url, audiences=audiences, destinations=destinations)
    CliRunner().invoke(cli, ["--config", str(config), "db", "upgrade"], catch_exceptions=False)

    def connection_warnings() -> list[str]:
        _, report = _check(config)
        return [w for w in report["warnings"] if "connections at once" in w]

    assert connection_warnings() == []
    text = config.read_text().replace(
        'space_id = "spa_1"\n', 'space_id = "spa_1"\nconcurrency = 64\n'
    )
    config.write_text(text + "\n[daemon]\nworkers = 64\n")
    warnings = connection_warnings()
    if state_url.startswith("sqlite"):
        assert warnings == []
        return
    (warning,) = warnings
    # 64 computations side by side, each with 64 delivery workers and 3 others; + 3.
    assert "the daemon may open 4291 connections at once" in warning
    assert "[daemon] workers = 64" in warning and "max_connections" in warning
