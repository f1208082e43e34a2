"""Inspection commands on a populated state DB: tables, JSON, and proof that they never write."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sync.cli import cli
from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"


@pytest.fixture
def populated(harness: Harness, receiver: Receiver) -> Harness:
    """Two runs: members a..e; one rejected for good (max_attempts 1), one left."""
    harness.defaults["max_attempts"] = 1
    harness.set_members(["a", "b", "c", "d", "bad"])
    receiver.poison = {"bad"}
    harness.sync()
    harness.set_members(["a", "b", "c", "bad", "e"])
    harness.sync()
    return harness


def invoke(config: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


COMMANDS = [
    ("status",),
    ("runs",),
    ("runs", KEY, "--limit", "1"),
    ("members", KEY),
    ("members", "High Value Users", "--failed"),
    ("members", KEY, "--exited", "--destination", "segment"),
    ("members", KEY, "--pending"),
    ("user", "bad"),
]


def run_everything(config: Path) -> dict[tuple[str, ...], object]:
    outputs: dict[tuple[str, ...], object] = {}
    for command in COMMANDS:
        invoke(config, *command)  # as a table
        outputs[command] = json.loads(invoke(config, *command, "--json"))
    return outputs


def test_inspection_tables_and_json(populated: Harness) -> None:
    config = populated.write_config()
    status = json.loads(invoke(config, "status", "--json"))
    (row,) = status
    assert (row["key"], row["state"], row["destination"]) == (KEY, "active", "segment")
    assert (row["members"], row["pending"], row["failed"]) == (5, 0, 1)
    # No daemon runs, so nothing is scheduled (the daemon writes its next runs: test_monitor).
    assert row["last_run"]["status"] == "partial" and row["next_run"] is None
    table = invoke(config, "status")
    assert KEY in table and "partial" in table
    assert "no daemon is running" in table

    runs = json.loads(invoke(config, "runs", "--json"))
    assert [r["status"] for r in runs] == ["partial", "partial"]
    assert runs[0]["added"] == 1 and runs[0]["removed"] == 1
    assert runs[0]["destinations"][0]["destination"] == "segment"
    assert "partial" in invoke(config, "runs", KEY)

    members = json.loads(invoke(config, "members", KEY, "--json"))
    assert [m["member_id"] for m in members] == ["a", "b", "bad", "c", "e"]
    failed = json.loads(invoke(config, "members", KEY, "--failed", "--json"))
    assert [(m["member_id"], m["status"]) for m in failed] == [("bad", "failed")]
    assert "invalid message bad" in failed[0]["last_error"]
    exited = json.loads(invoke(config, "members", KEY, "--exited", "--json"))
    assert [(m["member_id"], m["desired"], m["synced"]) for m in exited] == [("d", False, False)]
    assert "bad" in invoke(config, "members", KEY, "--failed")

    user = json.loads(invoke(config, "user", "bad", "--json"))
    assert [(u["audience"], u["destination"], u["desired"], u["synced"]) for u in user] == [
        (KEY, "segment", True, None)
    ]
    assert "is in no audience" in invoke(config, "user", "nobody")


def test_orphaned_audiences_are_listed(populated: Harness) -> None:
    populated.audience["name"] = "Someone Else"
    config = populated.write_config()
    rows = json.loads(invoke(config, "status", "--json"))
    assert {(r["key"], r["state"]) for r in rows} == {
        (KEY, "orphaned"),
        ("someone_else", "never synced"),
    }


def test_inspection_refuses_an_old_schema_without_migrating(populated: Harness) -> None:
    from sync.state.db import current_revision, downgrade

    downgrade(populated.engine, "0002")
    config = populated.write_config()
    result = CliRunner().invoke(cli, ["--config", str(config), "status"])
    assert result.exit_code == 1 and "run `audience-sync db upgrade`" in result.output
    assert current_revision(populated.engine) == "0002"


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("state.db*"))
    }


def test_inspection_never_writes(populated: Harness, tmp_path: Path) -> None:
    """SQLite: the file is unchanged. PostgreSQL, MariaDB: everything works for a SELECT-only
    role or user."""
    if populated.engine.dialect.name == "postgresql":
        _check_with_a_read_only_role(populated)
        return
    if populated.engine.dialect.name in ("mysql", "mariadb"):
        _check_with_a_read_only_mysql_user(populated)
        return
    config = populated.write_config()
    populated.engine.dispose()
    before = _fingerprint(tmp_path)
    assert "state.db" in before
    run_everything(config)
    after = _fingerprint(tmp_path)
    # The database file is byte-for-byte unchanged. Opening a WAL database may create the
    # -wal and -shm companions (SQLite's shared-memory index); the WAL gets no frames.
    assert after["state.db"] == before["state.db"]
    wal = tmp_path / "state.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def _check_with_a_read_only_role(populated: Harness) -> None:
    url = populated.engine.url
    schema = str(url.query["options"]).split("=", 1)[1]
    role = f"ro_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url.set(query={}), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE ROLE {role} LOGIN"))
            connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))
            connection.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}'))
        reader_url = make_url(url).set(username=role)
        # The role really cannot write: the test would pass vacuously otherwise.
        reader = create_engine(reader_url)
        with reader.connect() as connection, pytest.raises(Exception, match="permission denied"):
            connection.execute(text("UPDATE runs SET error = 'x'"))
        reader.dispose()
        populated.engine = create_engine(reader_url)
        outputs = run_everything(populated.write_config())
        assert outputs[("user", "bad")][0]["status"] == "failed"
    finally:
        populated.engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM {role}'))
            connection.execute(text(f'REVOKE ALL ON SCHEMA "{schema}" FROM {role}'))
            connection.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def _check_with_a_read_only_mysql_user(populated: Harness) -> None:
    url = populated.engine.url
    user = f"'ro_{uuid.uuid4().hex[:8]}'@'%'"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE USER {user}"))
            connection.execute(text(f"GRANT SELECT ON `{url.database}`.* TO {user}"))
        reader_url = url.set(username=user.split("'")[1])
        # The user really cannot write: the test would pass vacuously otherwise.
        reader = create_engine(reader_url)
        with reader.connect() as connection, pytest.raises(Exception, match="command denied"):
            connection.execute(text("UPDATE runs SET error = 'x'"))
        reader.dispose()
        populated.engine = create_engine(reader_url)
        outputs = run_everything(populated.write_config())
        assert outputs[("user", "bad")][0]["status"] == "failed"
    finally:
        populated.engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP USER IF EXISTS {user}"))
        admin.dispose()
