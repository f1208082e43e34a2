"""The delivery ledger: one row per message sent, the `sent_messages` view that answers "what
was sent to U", `user`/`members` showing the last sent value, and retention pruning."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text, update

from sync.cli import cli
from sync.clock import state_now
from sync.delivery import DeliveryHooks, ledger, prune_deliveries
from sync.engine import RunHooks
from sync.state.tables import DELIVERIES, DELIVERY_BATCHES, MEMBERSHIPS
from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"
WHAT_WAS_SENT_TO = """
SELECT computation, computation_kind, destination, id_kind, member_id, message_id,
       message_type, value, traits, version, batch_id, sent_at, outcome, reason, http_status,
       acknowledged_at
FROM sent_messages WHERE member_id = :member ORDER BY id, position
"""


def cli_json(config: Any, *args: str) -> Any:
    """What ``audience-sync --config CONFIG ARGS --json`` prints, decoded."""
    result = CliRunner().invoke(cli, ["--config", str(config), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def last_sent_at(harness: Harness, member: str) -> str:
    """When the ledger's newest message to ``member`` was sent, as `user --json` prints it."""
    with harness.engine.connect() as connection:
        sent_at = connection.execute(
            select(DELIVERIES.c.sent_at)
            .where(DELIVERIES.c.member_id == member)
            .order_by(DELIVERIES.c.id.desc(), DELIVERIES.c.position.desc())
        ).scalar()
    return str(sent_at.isoformat(timespec="seconds"))


def sent_to(harness: Harness, member: str) -> list[Any]:
    with harness.engine.connect() as connection:
        return list(connection.execute(text(WHAT_WAS_SENT_TO), {"member": member}).all())


def test_every_message_sent_has_a_ledger_row(harness: Harness, receiver: Receiver) -> None:
    """Acknowledged and rejected messages, each with its messageId, value, traits, version,
    batch, times and outcome; a leaver's false follows its true."""
    harness.set_members(["a", "b", "c"])
    receiver.poison = {"b"}
    assert harness.sync().status == "partial"
    received = {m["userId"]: m["messageId"] for m in receiver.messages()}

    (a,) = sent_to(harness, "a")
    assert (a.computation, a.computation_kind, a.destination) == (KEY, "audience", "segment")
    assert (a.id_kind, a.message_type, a.version) == ("user", "identify", 1)
    assert a.message_id == received["a"]
    assert json.loads(a.value) is True and json.loads(a.traits) == {"email": "a@example.com"}
    assert a.outcome == "acknowledged" and a.reason is None
    assert a.acknowledged_at is not None and a.sent_at <= a.acknowledged_at
    assert len(a.batch_id) == 32

    (b,) = sent_to(harness, "b")
    assert b.outcome == "rejected" and b.http_status == 400 and "HTTP 400" in b.reason
    assert b.acknowledged_at is None and "b" not in received

    receiver.poison = set()
    harness.set_members(["a", "b"])
    harness.sync()
    true, false = sent_to(harness, "c")
    assert (json.loads(true.value), json.loads(false.value)) == (True, False)
    assert false.version == 2 and false.outcome == "acknowledged"
    # c's own messages, in the order of the two runs (b's retry may arrive after c's false:
    # two pages, sent by concurrent workers).
    to_c = [m["messageId"] for m in receiver.messages() if m["userId"] == "c"]
    assert false.message_id == to_c[-1] != true.message_id == to_c[0]
    assert [r.outcome for r in sent_to(harness, "b")] == ["rejected", "acknowledged"]
    with harness.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(DELIVERIES)).scalar() == 5


def test_many_concurrent_batches_log_each_message_once(
    harness: Harness, receiver: Receiver
) -> None:
    """Batches recorded by four workers (on SQLite, grouped into shared transactions): one
    acknowledged row per message, with its own messageId, the value and traits sent."""
    members = [f"m{i:04d}" for i in range(600)]
    harness.set_members(members)
    harness.destinations["segment"].update(batch_size=7, concurrency=4)
    assert harness.sync().status == "succeeded"
    received = {m["userId"]: m["messageId"] for m in receiver.messages()}
    with harness.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT member_id, message_id, value, traits, outcome, batch_id FROM deliveries")
        ).all()
    assert sorted(r.member_id for r in rows) == members
    assert {r.member_id: r.message_id for r in rows} == received
    assert {(r.value, r.outcome) for r in rows} == {("true", "acknowledged")}
    assert all(json.loads(r.traits) == {"email": f"{r.member_id}@example.com"} for r in rows)
    assert len({r.batch_id for r in rows}) == len(receiver.batches()) == 86
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}


def test_a_large_batch_is_recorded_in_rows_of_bounded_size(
    harness: Harness, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's ledger text is cut into rows of about ``LEDGER_ROW_BYTES`` (the stored traits
    of members sent without them could make one row bigger than MariaDB's 16 MB packet, whose
    refusal would undo the acknowledgement on every run): every message is in the view once,
    a member's two messages (``mode = "both"``) stay in one row, and the rows' member counts
    add up to the batch's members."""
    monkeypatch.setattr(ledger, "LEDGER_ROW_BYTES", 1_000)
    harness.destinations["segment"]["mode"] = "both"
    members = [f"m{i:03d}" for i in range(40)]
    harness.set_members(members)
    assert harness.sync().status == "succeeded"
    with harness.engine.connect() as connection:
        rows = connection.execute(
            select(DELIVERY_BATCHES.c.member_count, DELIVERY_BATCHES.c.messages)
        ).all()
        messages = connection.execute(
            text("SELECT member_id, message_type, message_id, position FROM deliveries")
        ).all()
    assert len(receiver.batches()) == 1 and len(rows) > 3
    assert all(len(row.messages) < 1_000 + 600 for row in rows)
    assert sum(row.member_count for row in rows) == 40
    assert sorted((m.member_id, m.message_type) for m in messages) == [
        (m, kind) for m in members for kind in ("identify", "track")
    ]
    assert {m.message_id for m in messages} == {m["messageId"] for m in receiver.messages()}
    for row in rows:  # no member's messages are cut apart
        names = [entry[3] for entry in json.loads(row.messages)]
        assert names[::2] == names[1::2]


def test_mode_both_logs_the_identify_and_the_track(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["mode"] = "both"
    harness.set_members(["a"])
    harness.sync()
    rows = sent_to(harness, "a")
    assert sorted(r.message_type for r in rows) == ["identify", "track"]
    assert {r.message_id for r in rows} == {m["messageId"] for m in receiver.messages()}
    assert len({r.message_id for r in rows}) == 2 and {r.batch_id for r in rows} == {
        rows[0].batch_id
    }


def test_a_row_changed_in_flight_is_logged_as_sent(harness: Harness, receiver: Receiver) -> None:
    """The compare-and-set misses a row that changed while its batch was in flight: the
    ledger says what went (the old value, acknowledged by the destination), and the row stays
    pending, in doubt, for its new value."""
    harness.set_members(["a", "b"])

    def change_a() -> None:
        with harness.engine.begin() as connection:
            connection.execute(
                update(MEMBERSHIPS)
                .where(MEMBERSHIPS.c.member_id == "a")
                .values(value="false", desired=False, version=MEMBERSHIPS.c.version + 1)
            )

    harness.hooks = RunHooks(delivery=DeliveryHooks(before_record=change_a))
    harness.sync()
    (a,) = sent_to(harness, "a")
    assert (a.value, a.version, a.outcome) == ("true", 1, "acknowledged")
    assert a.message_id == next(m["messageId"] for m in receiver.messages() if m["userId"] == "a")
    (b,) = sent_to(harness, "b")
    assert (b.value, b.outcome) == ("true", "acknowledged")
    rows = harness.memberships()
    assert (rows["a"].status, rows["a"].in_doubt, rows["a"].version) == ("pending", True, 2)
    assert rows["b"].status == "in_sync"


def test_the_ledger_can_be_turned_off(harness: Harness, receiver: Receiver) -> None:
    """`[state] delivery_ledger = false`: acknowledgements as before, no rows."""
    harness.state["delivery_ledger"] = False
    harness.set_members(["a", "b"])
    receiver.poison = {"b"}
    assert harness.sync().status == "partial"
    assert sent_to(harness, "a") == [] and sent_to(harness, "b") == []
    rows = harness.memberships()
    assert (rows["a"].status, rows["b"].status) == ("in_sync", "rejected")


def test_a_member_with_huge_traits_is_acknowledged_and_logged(
    harness: Harness, receiver: Receiver
) -> None:
    """70 KB of traits (over MariaDB's TEXT, over the message limit): the message goes out
    without them, and the ledger records the traits it was sent with (the stored ones could
    make a batch's ledger row pass the state DB's packet limit, undoing the acknowledgement)."""
    harness.audience["query"] = "SELECT user_id, email, anonymous_id AS bio FROM members"
    harness.audience["traits"] = ["email", "bio"]
    harness.set_members([("a", "a@example.com", "x" * 70_000), "b"])
    assert harness.sync().status == "succeeded"
    (a,) = sent_to(harness, "a")
    (message,) = [m for m in receiver.messages() if m["userId"] == "a"]
    assert "bio" not in message["traits"] and message["traits"]["email"] == "a@example.com"
    assert a.outcome == "acknowledged" and json.loads(a.traits) == {"email": "a@example.com"}
    assert {row.status for row in harness.memberships().values()} == {"in_sync"}


def test_user_shows_the_acknowledgement_the_ledger_did_not_log(
    harness: Harness, receiver: Receiver
) -> None:
    """A leave sent while the ledger was off: `user` shows the acknowledged false (from the
    membership), not the ledger's older true."""
    harness.set_members(["a", "b"])
    harness.sync()
    harness.state["delivery_ledger"] = False
    harness.set_members(["b"])
    harness.sync()
    config = harness.write_config()
    result = CliRunner().invoke(cli, ["--config", str(config), "user", "a", "--json"])
    (row,) = json.loads(result.output)
    assert (row["last_sent"], row["last_outcome"], row["synced"]) == (False, "acknowledged", False)
    assert row["last_sent_at"] == row["delivered_at"]
    (b,) = json.loads(
        CliRunner().invoke(cli, ["--config", str(config), "user", "b", "--json"]).output
    )
    assert (b["last_sent"], b["last_outcome"]) == (True, "acknowledged")


def test_a_5xx_is_recorded_with_an_unknown_outcome(harness: Harness, receiver: Receiver) -> None:
    """A message that may have arrived without an acknowledgement: outcome unknown, its
    status; resent later with the same messageId and acknowledged."""
    harness.defaults["delivery_time_budget"] = "1s"
    harness.set_members(["a"])
    receiver.forced = "503"
    assert harness.sync().status == "partial"
    (first,) = sent_to(harness, "a")
    assert (first.outcome, first.http_status, first.acknowledged_at) == ("unknown", 503, None)
    receiver.forced = None
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE memberships SET next_attempt_at = NULL"))
    assert harness.sync().status == "succeeded"
    again = sent_to(harness, "a")[-1]
    assert again.outcome == "acknowledged" and again.message_id == first.message_id


def test_user_and_members_show_the_last_sent_value(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b"])
    harness.sync()
    harness.set_members(["a"])
    harness.sync()
    config = harness.write_config()

    (row,) = cli_json(config, "user", "b")
    assert row["last_sent"] is False and row["last_outcome"] == "acknowledged"
    assert row["last_sent_at"] == last_sent_at(harness, "b")
    exited = cli_json(config, "members", KEY, "--exited")
    assert [(r["member_id"], r["last_sent"]) for r in exited] == [("b", False)]
    (member,) = cli_json(config, "members", KEY)
    assert (member["member_id"], member["last_sent"]) == ("a", True)
    table = CliRunner().invoke(cli, ["--config", str(config), "user", "b"]).output
    assert "last sent" in table


def test_members_and_user_show_a_rejection_after_the_acknowledgement(
    harness: Harness, receiver: Receiver
) -> None:
    """The newest ledger message wins over the row's last acknowledgement, whether members
    are looked up one at a time (`user`: pre-filtered by text) or by page (`members`);
    messages older than every row's acknowledgement are not read."""
    harness.set_members(["a", "b", "c", "d", "e"])
    harness.sync()
    receiver.poison = {"b", "d"}
    harness.set_members(["a", "c", "e"])
    assert harness.sync().status == "partial"
    config = harness.write_config()

    def shown(rows: list[Any]) -> list[tuple[str, bool, str]]:
        return [(r["member_id"], r["last_sent"], r["last_outcome"]) for r in rows]

    assert shown(cli_json(config, "members", KEY)) == [(m, True, "acknowledged") for m in "ace"]
    assert shown(cli_json(config, "members", KEY, "--exited")) == [
        ("b", False, "rejected"),
        ("d", False, "rejected"),
    ]
    assert shown(cli_json(config, "user", "d")) == [("d", False, "rejected")]
    assert cli_json(config, "user", "b")[0]["last_sent_at"] == last_sent_at(harness, "b")


def test_rows_older_than_keep_deliveries_are_pruned(harness: Harness, receiver: Receiver) -> None:
    """`sync` prunes what is older than `[state] keep_deliveries`; younger rows stay."""
    harness.set_members(["a", "b"])
    harness.sync()
    with harness.engine.begin() as connection:
        old = state_now(connection) - timedelta(days=31)
        connection.execute(update(DELIVERY_BATCHES).values(sent_at=old))
    assert prune_deliveries(harness.engine, keep_seconds=40 * 86_400) == 0
    harness.set_members(["a", "b", "c"])
    harness.sync()  # default keep_deliveries: 30 days
    assert [r.member_id for r in sent_to(harness, "a") + sent_to(harness, "b")] == []
    assert len(sent_to(harness, "c")) == 1
    harness.set_members(["a", "b", "c", "d"])
    harness.sync()
    with harness.engine.begin() as connection:
        connection.execute(update(DELIVERY_BATCHES).values(sent_at=old))
    harness.config_extra = ""
    assert prune_deliveries(harness.engine, keep_seconds=86_400) == 1  # c's; d's is the newest
    assert prune_deliveries(harness.engine, keep_seconds=86_400) == 0
    assert [len(sent_to(harness, m)) for m in "cd"] == [0, 1]


def test_ledger_ids_are_never_reused_after_a_prune(harness: Harness, receiver: Receiver) -> None:
    """A prune that emptied the ledger let SQLite hand out its ids again (the largest id of
    an emptied table restarts at 1), so a run's rows could fall before its `runs.ledger_from`
    and its abandoned record counted none of them (hostile review). The newest row is kept."""
    harness.set_members(["a"])
    harness.sync()
    harness.set_members(["a", "b"])
    harness.sync()
    with harness.engine.begin() as connection:
        old = state_now(connection) - timedelta(days=31)
        connection.execute(update(DELIVERY_BATCHES).values(sent_at=old))
        last = connection.execute(select(func.max(DELIVERY_BATCHES.c.id))).scalar()
    assert prune_deliveries(harness.engine, keep_seconds=86_400) == 1
    harness.set_members(["a", "b", "c"])
    harness.sync()
    with harness.engine.connect() as connection:
        ids = connection.execute(
            select(DELIVERIES.c.id).where(DELIVERIES.c.member_id == "c")
        ).scalars()
        assert [new > last for new in ids] == [True]


def test_a_message_without_extra_traits_logs_sql_null(harness: Harness, receiver: Receiver) -> None:
    """No traits sent reads the same on every state DB: ``traits IS NULL``, not the text
    ``null``; acknowledged, rejected and leaving rows alike."""
    harness.audience["traits"] = []
    harness.set_members(["a", "b"])
    receiver.poison = {"b"}
    harness.sync()
    receiver.poison = set()
    harness.set_members(["b"])
    harness.sync()
    assert all(set(m["traits"]) == {KEY} for m in receiver.messages())  # no extra traits
    with harness.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT member_id, outcome, traits FROM sent_messages ORDER BY id")
        ).all()
    assert sorted((r.member_id, r.outcome) for r in rows) == [
        ("a", "acknowledged"),
        ("a", "acknowledged"),
        ("b", "acknowledged"),
        ("b", "rejected"),
    ]
    assert [r.traits for r in rows] == [None] * 4
