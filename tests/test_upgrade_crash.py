"""SIGKILL a real `audience-sync db upgrade` mid-migration, then upgrade again.

The upgrade pauses before a chosen SQL statement (the `--test-pause-before` seam), says so by
creating a file, and is killed there. SQLite and PostgreSQL migrate in one transaction, so the
killed upgrade leaves the revision it started from, with its data, and the rerun completes.
(MariaDB/MySQL commit each DDL statement at once: see README "State database".)
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, inspect, select, text

from sync.state.db import current_revision, head_revision, make_state_engine, upgrade
from sync.state.tables import MEMBERSHIPS, utcnow
from tests.processes import spawn, wait_for
from tests.test_db import schema_diff

# (database, revision the database starts at, the statement the upgrade is killed before)
KILL_POINTS = [
    *[
        (database, None, "CREATE TABLE memberships")  # mid-0001: "audiences already exists"
        for database in ("sqlite", "postgresql")
    ],
    *[
        (database, None, "UPDATE alembic_version SET version_num='0004'")  # between revisions
        for database in ("sqlite", "postgresql")
    ],
    ("sqlite", None, "DROP TABLE staged_members"),  # 0006 recreates a table
    ("sqlite", "0002", "DROP TABLE memberships"),  # 0003's batch copy of a table with rows
    ("sqlite", "0002", "ALTER TABLE _alembic_tmp_memberships RENAME"),  # copied, not renamed
    ("postgresql", "0002", "ALTER TABLE memberships ADD COLUMN in_doubt"),
    ("postgresql", "0005", "ALTER TABLE staged_members DROP CONSTRAINT"),
    # 0009 turns memberships' booleans into values: killed after filling them, before the
    # old column goes.
    ("sqlite", "0008", "CREATE TABLE _alembic_tmp_memberships"),
    ("postgresql", "0008", "ALTER TABLE memberships DROP COLUMN synced"),
]
MEMBERS = 500


def _state_url(database: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if database == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_schema_url"))


def _populate(engine: Engine) -> None:
    """An audience and its members, in the columns every revision has."""
    now = utcnow().replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audiences (id, key, name, definition_hash, created_at) "
                "VALUES (1, 'k', 'K', 'h', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO memberships (audience_id, destination, id_kind, member_id, desired,"
                " synced, version, changed_at, status, attempts) VALUES (1, 'segment', 'user',"
                " :member, true, true, 1, :now, 'in_sync', 0)"
            ),
            [{"member": f"u{i:04d}", "now": now} for i in range(MEMBERS)],
        )


def _members(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(MEMBERSHIPS)).scalar_one())


def _paused_upgrade(
    config: Path, statement: str, ready: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`db upgrade` that stops before ``statement`` and creates ``ready`` (the test seam);
    deleting ``ready`` lets it go on."""
    args = ["--test-pause-before", statement, "--test-ready-file", str(ready)]
    return spawn(config, "db", "upgrade", *args, log=log)


def _upgrade_completes(victim: subprocess.Popen[bytes], config: Path, engine: Engine) -> None:
    """A plain `db upgrade` (the killed one's command line) reaches head with the schema the
    tables describe."""
    rerun = subprocess.run(
        [*victim.args[:3], "--config", str(config), "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert current_revision(engine) == head_revision()
    assert schema_diff(engine) == []


@pytest.mark.slow
@pytest.mark.parametrize(("database", "start", "statement"), KILL_POINTS)
def test_killed_upgrade_leaves_the_previous_revision(
    database: str,
    start: str | None,
    statement: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    url = _state_url(database, request, tmp_path)
    engine = make_state_engine(url)
    try:
        if start:
            upgrade(engine, start)
            _populate(engine)
        config = tmp_path / "audience-sync.toml"
        config.write_text(f'[state]\nurl = "{url}"\n')
        ready = tmp_path / "paused"
        victim = _paused_upgrade(config, statement, ready, tmp_path / "killed.log")
        try:
            wait_for(ready.exists, 60, f"the upgrade to reach {statement!r}")
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
        assert current_revision(engine) == start
        if start:
            assert _members(engine) == MEMBERS

        _upgrade_completes(victim, config, engine)
        if start:
            assert _members(engine) == MEMBERS
    finally:
        engine.dispose()


# MariaDB/MySQL commit each DDL statement at once, so a killed upgrade leaves its revision
# half applied. Killed before each of these statements in turn (each after some DDL of its
# revision has committed), every next `db upgrade` resumes where the last one stopped.
MARIADB_KILL_POINTS = [
    "CREATE TABLE memberships",  # 0001: audiences and installation exist
    "CREATE TABLE runs",  # 0001: memberships and its indexes exist
    "CREATE TABLE staged_members",  # 0002: run_deliveries exists
    "UPDATE alembic_version SET version_num='0003'",  # 0003: in_doubt added
    "UPDATE alembic_version SET version_num='0006'",  # 0006: the foreign key is gone
    "CREATE TABLE destination_endpoints",  # 0008: audiences.destinations_hash added
    # 0009: audiences.kind added, its CHECK constraint not yet (a statement of its own).
    "ADD CONSTRAINT ck_audiences_computation_kind",
    "CREATE TABLE daemon_schedules",  # 0011: daemons exists
    "CREATE VIEW sent_messages",  # 0012: deliveries and its index exist
    "UPDATE alembic_version SET version_num='0013'",  # 0013: alerts_sent exists
]


@pytest.mark.slow
def test_a_mariadb_upgrade_killed_between_ddl_statements_resumes(
    mysql_database_url: str, tmp_path: Path
) -> None:
    engine = make_state_engine(mysql_database_url)
    config = tmp_path / "audience-sync.toml"
    config.write_text(f'[state]\nurl = "{mysql_database_url}"\n')
    try:
        for number, statement in enumerate(MARIADB_KILL_POINTS):
            ready = tmp_path / f"paused-{number}"
            log = tmp_path / f"killed-{number}.log"
            victim = _paused_upgrade(config, statement, ready, log)
            try:
                # The upgrade first completes what the last kill left half applied.
                wait_for(
                    lambda r=ready, v=victim: r.exists() or v.poll() is not None,
                    60,
                    f"the upgrade to reach {statement!r}",
                )
                assert ready.exists(), f"before {statement!r}: {log.read_text()}"
            finally:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=10)
        _upgrade_completes(victim, config, engine)
        # Autogenerate does not compare CHECK constraints: the one cut off is there.
        checks = inspect(engine).get_check_constraints("audiences")
        assert "ck_audiences_computation_kind" in {c["name"] for c in checks}
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_two_upgrades_at_once_take_turns(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A daemon and a cron `sync` with auto_upgrade (or two replicas) upgrading one new state
    DB together: the second waits for the first, then finds the schema current (and says so,
    not "upgraded from" the revision it saw before waiting). On MariaDB
    both used to run every revision, each inserting its version row: two heads, and every
    later command refused (hostile review)."""
    url = str(
        request.getfixturevalue(
            "postgres_schema_url" if database == "postgresql" else "mysql_database_url"
        )
    )
    engine = make_state_engine(url)
    config = tmp_path / "audience-sync.toml"
    config.write_text(f'[state]\nurl = "{url}"\n')
    ready = tmp_path / "paused"
    first = _paused_upgrade(config, "INSERT INTO alembic_version", ready, tmp_path / "first.log")
    second_log = tmp_path / "second.log"
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(ready.exists, 60, "the first upgrade to pause")
        second = spawn(config, "db", "upgrade", log=second_log)
        wait_for(
            lambda: "waiting for it" in second_log.read_text() or second.poll() is not None,
            60,
            "the second upgrade to wait or finish",
        )
        assert second.poll() is None, second_log.read_text()  # it waits, holding nothing
        ready.unlink()  # the first goes on
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
        assert second.wait(timeout=120) == 0, second_log.read_text()
        # What the second says is what it found once its turn came, not before it waited.
        assert "already at schema" in second_log.read_text(), second_log.read_text()
        assert "upgraded from" not in second_log.read_text(), second_log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        assert [v for (v,) in versions] == [head_revision()]
        assert schema_diff(engine) == []
    finally:
        engine.dispose()
