"""Exit codes of `sync` and `run --once` (README "Exit codes"): 0 every planned change
acknowledged, 1 a run failed, was guarded or found its audience busy, 2 a usage or config
error, 3 partial (something left pending, rejected or failed; or interrupted)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sync.cli import cli
from tests.harness import Harness
from tests.receiver import Receiver


def invoke(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    return result.exit_code, result.output


def test_sync_exit_codes(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["guard_min_members"] = 2
    harness.set_members(["a", "b", "c"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0

    # A member the destination refuses stays rejected: partial.
    receiver.poison = {"d"}
    harness.set_members(["a", "b", "c", "d"])
    code, output = invoke(config, "sync")
    assert code == 3 and "partial" in output, output
    assert invoke(config, "run", "--once")[0] == 3

    # Guarded (1) wins over partial (3): the worst outcome decides.
    harness.set_members([])
    code, output = invoke(config, "sync")
    assert code == 1 and "guarded" in output, output
    assert invoke(config, "run", "--once")[0] == 1

    receiver.poison = set()
    harness.set_members(["a", "b", "c", "d"])
    assert invoke(config, "sync")[0] == 0
    assert invoke(config, "run", "--once")[0] == 0

    # Bad credentials fail the run: 1.
    harness.destinations["segment"]["write_key"] = "revoked"
    harness.set_members(["a", "b", "c", "d", "e"])
    config = harness.write_config()
    code, output = invoke(config, "sync")
    assert code == 1 and "rejected the credentials" in output, output


def test_usage_and_config_errors_exit_2(harness: Harness, receiver: Receiver) -> None:
    config = harness.write_config()
    code, output = invoke(config, "sync", "nope")
    assert code == 2 and 'no audience named "nope"' in output, output
    assert invoke(config, "sync", "--include-exited")[0] == 2
    assert invoke(config, "sync", "--no-such-option")[0] == 2
    assert invoke(config.with_name("missing.toml"), "sync")[0] == 2
    config.write_text(config.read_text().replace("[defaults]", '[defaults]\nschedule = "never"'))
    for command in (["sync"], ["run", "--once"]):
        code, output = invoke(config, *command)
        assert code == 2 and "defaults.schedule" in output, output


def test_help_lists_the_exit_codes() -> None:
    for command in ("sync", "run"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        for line in (
            "0 every planned change was acknowledged",
            "1 a run failed, was guarded or found its audience busy",
            "2 usage or config error",
            "3 partial",
        ):
            assert line in text, (command, result.output)
