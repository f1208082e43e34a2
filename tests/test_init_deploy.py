"""`audience-sync init` as a new user runs it after `pip install`, and the deployment files
(Dockerfile, systemd unit) checked against what the daemon serves (CI cannot build images)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync.cli import cli
from sync.config import load_config
from sync.config.listen import parse_listen_address
from tests.conftest import REPO


@pytest.fixture
def in_empty_folder(tmp_path: Path) -> Path:
    before = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def test_init_writes_a_config_that_checks_and_an_env_example(in_empty_folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == 2 and "`audience-sync init` writes a commented one" in result.output

    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    config = in_empty_folder / "audience-sync.toml"
    env = in_empty_folder / ".env.example"
    assert config.read_text() == (REPO / "config.example.toml").read_text()
    assert "# [destinations.segment]" in config.read_text()  # commented
    env_text = env.read_text()
    assert "\nSEGMENT_WRITE_KEY=\n" in env_text
    assert "# AUDIENCE_SYNC_STATE_URL=sqlite:///audience-sync.db" in env_text
    assert "# AUDIENCE_SYNC_HTTP=127.0.0.1:9464" in env_text
    assert env_text.count("SEGMENT_WRITE_KEY=") == 1
    assert "\nVAR=" not in env_text  # the comment explaining ${VAR} is not a setting

    result = runner.invoke(cli, ["check", "--json"])  # as written, no variable set
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    assert not (in_empty_folder / "audience-sync.db").exists()


def test_init_never_overwrites(in_empty_folder: Path) -> None:
    runner = CliRunner()
    (in_empty_folder / ".env.example").write_text("MINE=1\n")
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 1
    assert ".env.example already exists; nothing written" in result.output
    assert not (in_empty_folder / "audience-sync.toml").exists()
    assert (in_empty_folder / ".env.example").read_text() == "MINE=1\n"

    result = runner.invoke(cli, ["init", "--dir", "elsewhere", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["written"] == [
        "elsewhere/audience-sync.toml",
        "elsewhere/.env.example",
    ]
    result = runner.invoke(cli, ["init", "--dir", "elsewhere"])
    assert (
        result.exit_code == 1 and "audience-sync.toml and elsewhere/.env.example" in result.output
    )


def test_the_image_serves_its_health_check_where_it_probes(tmp_path: Path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    listen = re.search(r"AUDIENCE_SYNC_HTTP=(\S+)", dockerfile)
    probe = re.search(r"urlopen\('http://([\d.]+):(\d+)/healthz'", dockerfile)
    assert listen and probe
    assert 'CMD ["run"]' in dockerfile and "USER audience-sync" in dockerfile
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    # The config init writes reads AUDIENCE_SYNC_HTTP into [daemon] http.
    config = tmp_path / "c.toml"
    config.write_text((REPO / "config.example.toml").read_text())
    loaded = load_config(config, environ={"AUDIENCE_SYNC_HTTP": listen.group(1)})
    address = parse_listen_address(loaded.daemon.http)
    assert address is not None
    assert (address.host, address.port) == ("0.0.0.0", int(probe.group(2)))
    assert not address.loopback
    default = load_config(config, environ={})
    assert default.daemon.http == "127.0.0.1:9464"  # loopback unless the image says otherwise


def test_the_systemd_unit_runs_the_daemon() -> None:
    unit = (REPO / "deploy" / "audience-sync.service").read_text()
    assert re.search(r"^ExecStart=\S*audience-sync .*\brun$", unit, re.M)
    assert "User=audience-sync" in unit and "EnvironmentFile=" in unit
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert stop > 30  # longer than the default [daemon] shutdown_timeout
