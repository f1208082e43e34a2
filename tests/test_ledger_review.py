"""The per-batch delivery ledger (migration 0018) under hostile input, from a review: odd
member ids and traits through the views and `user`, huge traits, 0018 killed or failing on
MariaDB/MySQL, a kill mid-delivery, split batches."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, insert, text

from sync.state.db import downgrade, make_state_engine, upgrade
from sync.state.inspection import user_rows
from sync.state.tables import AUDIENCES, DELIVERY_BATCHES, MEMBERSHIPS
from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver

KEY = "high_value_users"


def view(harness: Harness, where: str = "", params: dict[str, Any] | None = None) -> list[Any]:
    with harness.engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT id, position, member_id, message_id, message_type, value, traits,"
                    f" version, outcome FROM deliveries {where} ORDER BY id, position"
                ),
                params or {},
            ).all()
        )


WEIRD = [
    'q"uote',
    "back\\slash",
    "emoji😀𝄞",
    "ctl\x01\x1f\x7f",
    " lead",
    "trail ",
    "a",
    "A",
    "a ",
    "é",
    "e",
    "x" * 255,
    "pct%_/",
    "\u2028sep",
    "<script>",
]


def test_weird_member_ids_round_trip(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(WEIRD)
    assert harness.sync().status == "succeeded"
    rows = view(harness)
    received = {m["userId"]: m for m in receiver.messages()}
    assert sorted(r.member_id for r in rows) == sorted(WEIRD)
    for r in rows:
        assert r.message_id == received[r.member_id]["messageId"], r.member_id
        assert json.loads(r.traits) == {"email": f"{r.member_id}@example.com"}
    for member in WEIRD:
        found = view(harness, "WHERE member_id = :m", {"m": member})
        assert [f.member_id for f in found] == [member], repr(member)
        with harness.engine.connect() as connection:
            got = user_rows(connection, member)
        assert [(g["member_id"], g["last_sent"], g["last_outcome"]) for g in got] == [
            (member, True, "acknowledged")
        ], repr(member)


TRAITS_QUERY = "SELECT user_id, email, f, g, n, z, tenth, u, empty, nada, nested FROM t"


def _traits_table(harness: Harness, members: list[str]) -> None:
    harness.warehouse_sql(
        "CREATE TABLE t (user_id TEXT, email TEXT, f REAL, g REAL, n INTEGER, z REAL,"
        " tenth REAL, u TEXT, empty TEXT, nada TEXT, nested TEXT)"
    )
    for m in members:
        harness.warehouse_sql(
            (
                "INSERT INTO t VALUES (?, ?, 1.0, 1e300, 9007199254740993, -0.0, 0.1, ?, '',"
                " NULL, ?)",
                (m, m + "@x", 'é😀"\\\u2028\x01', '{"a": [1, 2.50, {"b": null}]}'),
            )
        )


def test_traits_round_trip(harness: Harness, receiver: Receiver) -> None:
    harness.audience["query"] = TRAITS_QUERY
    _traits_table(harness, ["a", "b"])
    harness.audience["traits"] = [
        "email",
        "f",
        "g",
        "n",
        "z",
        "tenth",
        "u",
        "empty",
        "nada",
        "nested",
    ]
    harness.set_members(["a", "b"])
    assert harness.sync().status == "succeeded"
    stored = {m: row.traits for m, row in harness.memberships().items()}
    sent = {m["userId"]: m["traits"] for m in receiver.messages()}
    for r in view(harness):
        stored_text = stored[r.member_id]
        stored_text = stored_text if isinstance(stored_text, str) else json.dumps(stored_text)
        assert json.loads(r.traits) == json.loads(stored_text)
        wire = dict(sent[r.member_id])
        wire.pop(KEY)
        assert json.loads(r.traits) == wire


GROUP = "support_traits"


def test_trait_group_object_values(harness: Harness, receiver: Receiver) -> None:
    harness.warehouse_sql(
        "CREATE TABLE summary (user_id TEXT, plan TEXT, score REAL, big INTEGER, obj TEXT)",
        "INSERT INTO summary VALUES ('u1', 'pro😀', 1.0, 9007199254740993, '{\"k\": [1, \"x\"]}')",
        "INSERT INTO summary VALUES ('u\"2', 'x\\y', 1e300, -1, NULL)",
    )
    harness.config_extra = (
        f'[[traits]]\nname = "{GROUP}"\nsource = "warehouse"\ndestinations = ["segment"]\n'
        'query = "SELECT user_id, plan, score, big, obj FROM summary"\n'
    )
    assert harness.sync_named(GROUP).status == "succeeded"
    stored = {m: row.value for m, row in harness.memberships().items()}
    sent = {m["userId"]: m["traits"] for m in receiver.messages()}
    rows = view(harness)
    assert sorted(r.member_id for r in rows) == sorted(stored)
    for r in rows:
        assert json.loads(r.value) == sent[r.member_id], r
        assert r.value == stored[r.member_id], "the view's value text differs from what was stored"
        with harness.engine.connect() as connection:
            (got,) = user_rows(connection, r.member_id)
        assert got["last_sent"] == sent[r.member_id]


def _bio(harness: Harness, rows: list[tuple[str, str]]) -> None:
    harness.audience["query"] = "SELECT user_id, email, anonymous_id AS bio FROM members"
    harness.audience["traits"] = ["email", "bio"]
    harness.set_members([(m, f"{m}@example.com", bio) for m, bio in rows])


def test_many_members_with_70kb_traits_in_one_batch(harness: Harness, receiver: Receiver) -> None:
    """300 members x 70 KB of stored traits in one batch (~21 MB, over MariaDB's 16 MB packet):
    sent without them, acknowledged, and logged with the traits sent."""
    harness.destinations["segment"]["batch_size"] = 300
    members = [f"m{i:03d}" for i in range(300)]
    _bio(harness, [(m, "é" * 70_000) for m in members])
    assert harness.sync().status == "succeeded"
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}
    rows = view(harness)
    assert len(rows) == 300
    assert all(json.loads(r.traits) == {"email": f"{r.member_id}@example.com"} for r in rows)


def test_a_ledger_row_can_pass_mariadbs_packet(harness: Harness, receiver: Receiver) -> None:
    """A member with 8.5 MB of stored traits in mode "both" (its memberships and staging rows
    fit MariaDB's 16 MB max_allowed_packet; the messages go out without them) made one 17 MB
    ledger INSERT when the ledger recorded the stored traits, once per message: its refusal
    undid the batch's acknowledgement, on every run. The ledger records what was sent."""
    harness.destinations["segment"]["mode"] = "both"
    _bio(harness, [("big", "x" * 8_500_000), ("small", "s")])
    report = harness.sync()
    assert len(harness.memberships()) == 2, report.error
    states = {m: row.status for m, row in harness.memberships().items()}
    assert states == {"big": "in_sync", "small": "in_sync"}, (report.status, report.error)


# --- migration 0018 -------------------------------------------------------------------------


@pytest.fixture
def mariadb_engine(mysql_database_url: str) -> Iterator[Engine]:
    """A MariaDB state DB migrated to head."""
    engine = make_state_engine(mysql_database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _old_rows(engine: Engine, count: int) -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(
            insert(AUDIENCES).values(id=1, key="k", name="K", definition_hash="h", created_at=now)
        )
        connection.execute(
            text(
                "INSERT INTO deliveries (id, message_id, message_type, batch_id, audience_id,"
                " destination, id_kind, member_id, value, traits, version, outcome, reason,"
                " http_status, sent_at, acknowledged_at) VALUES (:id, :mid, 'identify', 'b', 1,"
                " 'segment', 'user', :member, 'true', :traits, 1, 'acknowledged', NULL, NULL,"
                " :now, :now)"
            ),
            [
                {
                    "id": i + 1,
                    "mid": f"as-{i}-v1",
                    "member": f"m{i}\x1b\x1f" if i % 2 else f"m{i}",
                    "traits": None if i % 3 == 0 else '{"a": "é😀"}',
                    "now": now,
                }
                for i in range(count)
            ],
        )


def test_0018_rerun_after_a_kill_on_mariadb(mariadb_engine: Engine) -> None:
    """The migration says a rerun on MariaDB/MySQL "copies what a killed one did not": a kill
    after its CREATE TABLE delivery_batches (DDL commits at once) and part of the copy must
    let `db upgrade` complete."""
    state_engine = mariadb_engine  # DDL commits at once only there
    downgrade(state_engine, "0017")
    _old_rows(state_engine, 10)
    with state_engine.begin() as connection:  # what a killed 0018 left: its table, 3 rows
        DELIVERY_BATCHES.create(connection)
        connection.execute(
            text(
                "INSERT INTO delivery_batches (id, batch_id, audience_id, destination, outcome,"
                " sent_at, member_count, messages) SELECT id, batch_id, audience_id,"
                " destination, outcome, sent_at, 1, CONCAT('[[', JSON_QUOTE(message_id),"
                " ',\"identify\",\"user\",', JSON_QUOTE(member_id), ',1,true,null]]')"
                " FROM deliveries WHERE id <= 3"
            )
        )
    upgrade(state_engine)
    with state_engine.connect() as connection:
        ids = connection.execute(text("SELECT id FROM deliveries ORDER BY id")).scalars().all()
    assert ids == list(range(1, 11))


def test_user_finds_migrated_rows(state_engine: Engine) -> None:
    """Rows copied by 0018 (JSON built by the database, whose escapes may differ from
    Python's) are found by `user`."""
    downgrade(state_engine, "0017")
    _old_rows(state_engine, 4)
    upgrade(state_engine)

    now = datetime(2026, 11, 30, tzinfo=UTC)
    with state_engine.begin() as connection:
        for member in ("m0", "m1\x1b\x1f"):
            connection.execute(
                insert(MEMBERSHIPS).values(
                    audience_id=1,
                    destination="segment",
                    id_kind="user",
                    member_id=member,
                    desired=True,
                    value="true",
                    version=1,
                    changed_at=now,
                    status="pending",
                )
            )
    with state_engine.connect() as connection:
        for member in ("m0", "m1\x1b\x1f"):
            (row,) = user_rows(connection, member)
            assert (row["last_sent"], row["last_outcome"]) == (True, "acknowledged"), repr(member)


def test_0018_downgrade_rerun_after_a_failure_on_mariadb(mariadb_engine: Engine) -> None:
    """A downgrade that stops during its INSERT into deliveries_0017 (killed, or an error; the
    INSERT rolls back, the CREATE TABLE before it committed on MariaDB) leaves deliveries_0017
    empty: the rerun sees the table, skips the copy, and drops delivery_batches: every ledger
    row is lost. (Here the INSERT fails on a row whose member id is missing.)"""
    state_engine = mariadb_engine  # DDL commits at once only there
    downgrade(state_engine, "0017")
    _old_rows(state_engine, 10)
    upgrade(state_engine)
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with state_engine.begin() as connection:
        bad = connection.execute(
            insert(DELIVERY_BATCHES).values(
                batch_id="x",
                audience_id=1,
                destination="segment",
                outcome="acknowledged",
                sent_at=now,
                member_count=1,
                messages='[["as-x-v1","identify","user"]]',
            )
        ).inserted_primary_key[0]
    with pytest.raises(sqlalchemy.exc.DBAPIError):
        downgrade(state_engine, "0017")
    with state_engine.begin() as connection:
        connection.execute(text(f"DELETE FROM delivery_batches WHERE id = {bad}"))
    downgrade(state_engine, "0017")  # the rerun
    with state_engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM deliveries")).scalar()
    assert count == 10


# --- kill -9 mid-delivery ---------------------------------------------------------------------


def _ledger_agrees(harness: Harness) -> None:
    with harness.engine.connect() as connection:
        missing = connection.execute(
            text(
                "SELECT m.member_id, m.version FROM memberships m WHERE m.status = 'in_sync'"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.member_id = m.member_id"
                " AND d.version = m.version AND d.outcome = 'acknowledged'"
                " AND d.destination = m.destination)"
            )
        ).all()
        dupes = connection.execute(
            text(
                "SELECT message_id, outcome, batch_id, count(*) FROM deliveries"
                " GROUP BY message_id, outcome, batch_id HAVING count(*) > 1"
            )
        ).all()
    assert missing == [] and dupes == []


def test_kill_mid_delivery_ledger_agrees(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.destinations["segment"].update(batch_size=50, concurrency=2)
    harness.destinations["segment"]["mode"] = "both"
    harness.config_extra = '\n[daemon]\nlease_seconds = "5s"\n'
    members = [f"u{i:05d}" for i in range(3000)]
    harness.set_members(members)
    config = harness.write_config()
    receiver.delay = 0.03
    victim = spawn(config, "sync", "--wait", "30", log=tmp_path / "1.log")
    wait_for(lambda: len(receiver.requests) >= 10, 30, "delivery")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    _ledger_agrees(harness)
    receiver.delay = 0
    final = subprocess.run(
        [*victim.args[:-3], "sync", "--wait", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stdout + final.stderr
    _ledger_agrees(harness)
    runs = harness.runs()
    assert runs[0].status == "abandoned"
    with harness.engine.connect() as connection:
        first, second = runs[0], runs[1]
        acked = connection.execute(
            text(
                "SELECT count(DISTINCT member_id) FROM deliveries WHERE outcome = 'acknowledged'"
                " AND id > :a AND id <= :b"
            ),
            {"a": first.ledger_from, "b": second.ledger_from},
        ).scalar()
        total = connection.execute(
            text("SELECT count(DISTINCT member_id) FROM deliveries WHERE outcome='acknowledged'")
        ).scalar()
    assert first.sent == acked, (first.sent, acked)
    assert total == 3000
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}


# --- split batches, 4xx/5xx -----------------------------------------------------------------


def test_split_batch_outcomes_per_message(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["mode"] = "both"
    harness.defaults["delivery_time_budget"] = "1s"
    members = [f"m{i}" for i in range(10)]
    harness.set_members(members)
    receiver.poison = {"m3", "m7"}
    assert harness.sync().status == "partial"
    rows = view(harness)
    with harness.engine.connect() as connection:
        full = connection.execute(
            text(
                "SELECT d.member_id, d.message_type, d.outcome, d.http_status, d.reason, d.batch_id, "
                "b.member_count FROM deliveries d JOIN delivery_batches b ON b.id = d.id"
            )
        ).all()
    assert len(rows) == 20
    for r in full:
        if r.member_id in ("m3", "m7"):
            assert (r.outcome, r.http_status) == ("rejected", 400) and "HTTP 400" in r.reason
        else:
            assert (r.outcome, r.http_status, r.reason) == ("acknowledged", None, None)
    assert len({r.batch_id for r in full}) == 1
    receiver.poison = set()
    receiver.forced = "429"
    harness.set_members(["m0"])
    assert harness.sync().status == "partial"
    with harness.engine.connect() as connection:
        last = connection.execute(
            text(
                "SELECT DISTINCT outcome, http_status FROM deliveries WHERE id = "
                "(SELECT max(id) FROM delivery_batches)"
            )
        ).all()
        counts = connection.execute(
            text("SELECT outcome, sum(member_count) FROM delivery_batches GROUP BY outcome")
        ).all()
    assert last == [("refused", 429)], last
    assert dict(counts)["acknowledged"] == 8 and dict(counts)["rejected"] == 2
    runs = harness.runs()
    assert (runs[0].sent, runs[0].rejected) == (8, 2)
