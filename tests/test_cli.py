import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sync.cli import cli
from tests.conftest import REPO


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_every_command_has_help_text() -> None:
    runner = CliRunner()
    assert cli.help
    for path, command in all_commands(cli):
        assert command.help, f"{' '.join(path)} has no help text"
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
        assert " ".join(command.help.split()[:6]) in " ".join(result.output.split())
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"


def write_config(tmp_path: Path, state_url: str, extra: str = "") -> Path:
    warehouse = tmp_path / "warehouse.db"
    import sqlite3

    with sqlite3.connect(warehouse) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS users (user_id TEXT)")
    path = tmp_path / "audience-sync.toml"
    path.write_text(
        f"""
[state]
url = "{state_url}"

[sources.warehouse]
url = "sqlite:///warehouse.db"

[destinations.preview]
type = "file"
path = "out.jsonl"

[[audiences]]
name = "High Value Users"
source = "warehouse"
query = "SELECT user_id FROM users"
destinations = ["preview"]
{extra}
"""
    )
    return path


def test_check_example_config_on_a_fresh_clone(tmp_path: Path) -> None:
    # A copy, so the test sees the "fresh clone" state whatever the work tree holds.
    config = tmp_path / "config.example.toml"
    config.write_text((REPO / "config.example.toml").read_text())
    result = CliRunner().invoke(cli, ["--config", str(config), "check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert [(a["key"], a["kind"]) for a in report["audiences"]] == [
        ("order_completed_last_30days", "audience"),
        ("high_value_users", "audience"),
        ("lapsed_buyers", "audience"),
        ("trial_expiring_7d", "audience"),
        ("order_insights", "trait"),
        ("order_stats", "trait"),
    ]
    assert not (tmp_path / "audience-sync.db").exists(), "check must not create the state DB"


def test_check_table_and_db_commands(tmp_path: Path, state_url: str) -> None:
    config = write_config(tmp_path, state_url)
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(config), "check"])
    assert result.exit_code == 0, result.output
    assert "high_value_users" in result.output and "connected" in result.output

    result = runner.invoke(cli, ["--config", str(config), "db", "current", "--json"])
    if state_url.startswith("sqlite"):
        assert result.exit_code == 1 and "db upgrade" in result.output
    else:
        assert json.loads(result.output)["state"] == "empty"

    result = runner.invoke(cli, ["--config", str(config), "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "upgraded from empty to" in result.output
    result = runner.invoke(cli, ["--config", str(config), "db", "upgrade"])
    assert "already at schema" in result.output
    result = runner.invoke(cli, ["--config", str(config), "db", "current", "--json"])
    assert json.loads(result.output)["state"] == "current"


def test_unreachable_source_fails_check_with_its_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}")
    config.write_text(config.read_text().replace("sqlite:///warehouse.db", "sqlite:///gone.db"))
    result = CliRunner().invoke(cli, ["--config", str(config), "check", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    source = report["connections"][1]
    assert source["ok"] is False and 'source "warehouse"' in source["detail"]


@pytest.mark.parametrize("command", [["sync"], ["status"], ["run", "--once"], ["db", "upgrade"]])
def test_an_unreachable_state_db_is_one_line(tmp_path: Path, command: list[str]) -> None:
    url = "postgresql+psycopg://sync:statepw_XYZ@127.0.0.1:1/state"
    config = write_config(tmp_path, url)
    result = CliRunner().invoke(cli, ["--config", str(config), *command])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and "Connection refused" in lines[0], lines[0]
    assert "statepw_XYZ" not in lines[0]


def test_bad_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sqlite:///s.db", extra='schedule = "every fortnight"')
    result = subprocess.run(
        [sys.executable, "-m", "sync", "--config", str(config), "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2  # a config error (README "Exit codes")
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "audiences[0].schedule" in lines[0] and "every fortnight" in lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sync", "--debug", "--config", str(tmp_path / "none.toml"), "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}")
    monkeypatch.setenv("AUDIENCE_SYNC_CONFIG", str(config))
    result = CliRunner().invoke(cli, ["check", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"] == str(config)
