"""Each audience runs in its own error boundary, and every stored or printed error is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select, text

from sync.cli import cli
from sync.state.tables import AUDIENCES, RUNS
from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"
FIRST = "Broken First"


def add_first_audience(harness: Harness, source_url: str, query: str) -> Path:
    """A config whose audience "Broken First" (on ``source_url``) comes before the harness's."""
    first = f"""
[sources.other]
url = "{source_url}"

[[audiences]]
name = "{FIRST}"
source = "other"
query = "{query}"
destinations = ["segment"]

"""
    config = harness.config_text()
    at = config.index("[[audiences]]")
    path = harness.tmp_path / "audience-sync.toml"
    path.write_text(config[:at] + first + config[at:])
    return path


def runs_by_audience(engine: Engine) -> dict[str, list[str | None]]:
    query = select(AUDIENCES.c.key, RUNS.c.error).join(AUDIENCES).order_by(RUNS.c.id)
    with engine.connect() as connection:
        found: dict[str, list[str | None]] = {}
        for key, error in connection.execute(query).all():
            found.setdefault(key, []).append(error)
        return found


def sync_both(path: Path, command: str) -> tuple[int, str, str]:
    """Exit code, all output (logs included) and stdout."""
    args = ["sync", FIRST, KEY, "--json"] if command == "sync" else ["run", "--once"]
    result = CliRunner().invoke(cli, ["--config", str(path), *args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output, result.stdout


def assert_one_line(error: str | None, *absent: str) -> None:
    assert error and "\n" not in error, error
    for needle in ("[SQL", "INSERT", "parameters", *absent):
        assert needle not in error, error


@pytest.mark.parametrize("command", ["sync", "run --once"])
def test_a_missing_source_driver_fails_only_its_audience(
    harness: Harness, receiver: Receiver, command: str
) -> None:
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here: the driver is not missing")
    harness.set_members(["a", "b"])
    path = add_first_audience(harness, "mysql+mysqldb://reader@127.0.0.1:1/shop", "SELECT 1")
    code, output, stdout = sync_both(path, command)
    assert code == 1, output
    assert {m["userId"] for m in receiver.messages()} == {"a", "b"}
    errors = runs_by_audience(harness.engine)
    (broken,) = errors["broken_first"]
    assert_one_line(broken)
    assert "audience-sync[mysql]" in broken and "MySQLdb" in broken
    assert errors[KEY] == [None]
    if command == "sync":
        reports = {r["key"]: r for r in json.loads(stdout)}
        assert reports["broken_first"]["error"] == broken
        assert reports[KEY]["status"] == "succeeded"


def poison_memberships(engine: Engine, table: str = "memberships") -> None:
    """Make the state DB refuse one member's row, as a full disk or a lost server would
    refuse a write mid-run (a real trigger, on every state DB)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(
                text(
                    f"CREATE TRIGGER poison BEFORE INSERT ON {table} "
                    "WHEN NEW.member_id = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
                )
            )
            return
        if engine.dialect.name in ("mysql", "mariadb"):
            connection.execute(
                text(
                    f"CREATE TRIGGER poison BEFORE INSERT ON {table} FOR EACH ROW "
                    "IF NEW.member_id = 'poison' THEN SIGNAL SQLSTATE 'HY000' "
                    "SET MESSAGE_TEXT = 'The table is full'; END IF"
                )
            )
            return
        connection.execute(
            text(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.member_id = 'poison' THEN "
                "RAISE EXCEPTION 'could not extend file: No space left on device' "
                "USING DETAIL = 'member ' || NEW.member_id; "
                "END IF; RETURN NEW; END $$"
            )
        )
        connection.execute(
            text(
                f"CREATE TRIGGER poison BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION poison()"
            )
        )


@pytest.mark.parametrize("command", ["sync", "run --once"])
def test_a_state_db_error_fails_only_its_audience_in_one_line(
    harness: Harness, receiver: Receiver, command: str
) -> None:
    harness.set_members(["a", "b"])
    query = "SELECT 'poison' AS user_id UNION ALL SELECT 'c' AS user_id"
    path = add_first_audience(harness, harness.source_url, query)
    poison_memberships(harness.engine)
    code, output, stdout = sync_both(path, command)
    assert code == 1, output
    assert {m["userId"] for m in receiver.messages()} == {"a", "b"}
    errors = runs_by_audience(harness.engine)
    (broken,) = errors["broken_first"]
    assert_one_line(broken, "poison", "DETAIL", "CONTEXT")
    assert "state database error" in broken and ("full" in broken or "space" in broken)
    assert errors[KEY] == [None]
    if command == "sync":
        reports = {r["key"]: r for r in json.loads(stdout)}
        assert reports["broken_first"]["error"] == broken
    else:
        error_lines = [line for line in output.splitlines() if "broken_first" in line]
        assert error_lines and all("poison" not in line for line in error_lines), output


def test_a_state_db_error_while_staging_is_not_blamed_on_the_source(
    harness: Harness, receiver: Receiver
) -> None:
    """Staging writes the source's rows into the state DB: when that write fails (disk full)
    the error is the state database's, not a failed source query."""
    harness.set_members(["a", "poison", "b"])
    poison_memberships(harness.engine, "staged_members")
    report = harness.sync()
    assert report.status == "failed"
    assert report.error.startswith("state database error"), report.error
    assert "source" not in report.error, report.error


def test_check_names_the_extra_to_install(harness: Harness) -> None:
    """`check` prints the install hint whole (rich took `[mysql]` for markup)."""
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here: the driver is not missing")
    path = add_first_audience(harness, "mysql+mysqldb://reader@127.0.0.1:1/shop", "SELECT 1")
    result = CliRunner().invoke(cli, ["--config", str(path), "check"], terminal_width=250)
    assert "audience-sync[mysql]" in result.output, result.output
