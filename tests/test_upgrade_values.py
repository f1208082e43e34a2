"""A state database written by audience-sync at revision 0008 (booleans, before trait groups:
tests/fixtures/make_state_0008.py wrote it with that version) upgrades to values, and the next
sync sends nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from sync.run.drift import record_endpoints
from sync.state.db import current_revision, head_revision, make_state_engine, upgrade
from sync.state.tables import AUDIENCES, DESTINATION_ENDPOINTS, MEMBERSHIPS, utcnow
from tests.harness import Harness
from tests.receiver import Receiver

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_SCHEMA = "audience_sync_fixture"
# What the history in make_state_0008.py leaves: (desired, value, synced_value, version).
EXPECTED = {
    "u1": (True, "true", "true", 1),
    "u2": (True, "true", "true", 1),
    "u3": (True, "true", "true", 1),
    "u4": (False, "false", "false", 2),
    "u5": (False, "false", "false", 2),
    "u6": (False, "false", "false", 2),
    "u7": (True, "true", "true", 1),
}


def _load(database: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if database == "sqlite":
        shutil.copy(FIXTURES / "state_0008.db", tmp_path / "state.db")
        return f"sqlite:///{tmp_path / 'state.db'}"
    url = str(request.getfixturevalue("postgres_schema_url"))
    schema = make_url(url).query["options"].split("=")[-1]
    dump = (FIXTURES / "state_0008_postgresql.sql").read_text()
    dump = dump.replace(f"CREATE SCHEMA {FIXTURE_SCHEMA};", "").replace(FIXTURE_SCHEMA, schema)
    plain = make_url(url)
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(plain.host), "-p",
         str(plain.port or 5432), "-U", str(plain.username), str(plain.database)],
        input=dump, text=True, check=True, capture_output=True,
    )  # fmt: skip
    return url


def _rows(engine: Engine) -> dict[str, tuple[object, ...]]:
    columns = (M := MEMBERSHIPS).c
    query = select(columns.member_id, columns.desired, columns.value, columns.synced_value,
                   columns.version, columns.status)  # fmt: skip
    with engine.connect() as connection:
        return {r[0]: tuple(r[1:]) for r in connection.execute(query.select_from(M))}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_state_written_before_values_upgrades_and_sends_nothing(
    database: str, request: pytest.FixtureRequest, tmp_path: Path, receiver: Receiver
) -> None:
    url = _load(database, request, tmp_path)
    engine = make_state_engine(url)
    try:
        assert current_revision(engine) == "0008"
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        rows = _rows(engine)
        assert rows == {member: (*values, "in_sync") for member, values in EXPECTED.items()}

        harness = Harness(tmp_path, engine, receiver.url)
        harness.set_members(["u1", "u2", "u3", "u7"])
        config = harness.config()
        with engine.begin() as connection:
            kind = connection.execute(select(AUDIENCES.c.kind)).scalar_one()
            assert kind == "audience"
            # The fixture was written to a file destination named "segment"; this one is the
            # test's receiver: record it as the endpoint those rows were sent to.
            audience_id = connection.execute(select(AUDIENCES.c.id)).scalar_one()
            connection.execute(DESTINATION_ENDPOINTS.delete())
            record_endpoints(connection, config, audience_id, ["segment"], utcnow())
        report = harness.sync()
        assert report.status == "succeeded", report.error
        assert receiver.messages() == []
        assert _rows(engine) == rows
        # And the state works on: u3 leaves, gets its false, once.
        harness.set_members(["u1", "u2", "u7"])
        harness.sync()
        assert [(m["userId"], m["traits"]["high_value_users"]) for m in receiver.messages()] == [
            ("u3", False)
        ]
    finally:
        engine.dispose()
