"""SQL trait groups: a row of values per user, sent when it changes (README "SQL traits")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Harness
from tests.receiver import Receiver

GROUP = "Support Traits"
KEY = "support_traits"


def _group(harness: Harness, on_exit: str = "null", query: str | None = None) -> None:
    harness.warehouse_sql(
        "CREATE TABLE IF NOT EXISTS summary (user_id TEXT, open_tickets INTEGER, plan TEXT, "
        "last_ticket_at TEXT)"
    )
    query = query or "SELECT user_id, open_tickets, plan, last_ticket_at FROM summary"
    harness.config_extra = (
        "[[traits]]\n"
        f'name = "{GROUP}"\n'
        'source = "warehouse"\n'
        f'query = "{query}"\n'
        'destinations = ["segment"]\n'
        f'on_exit = "{on_exit}"\n'
    )


def _rows(harness: Harness, rows: list[tuple[Any, ...]]) -> None:
    harness.warehouse_sql("DELETE FROM summary")
    for row in rows:
        harness.warehouse_sql(("INSERT INTO summary VALUES (?, ?, ?, ?)", row))


def _sent(receiver: Receiver) -> dict[str, dict[str, Any]]:
    """Each user's traits in the messages since the last reset (one message per user)."""
    messages = receiver.messages()
    users = [m["userId"] for m in messages]
    assert len(users) == len(set(users)), users
    return {m["userId"]: m["traits"] for m in messages}


def test_first_sync_sends_every_row_then_only_changes(harness: Harness, receiver: Receiver) -> None:
    _group(harness)
    _rows(harness, [("u1", 2, "pro", "2026-11-01T10:00:00Z"), ("u2", 0, "free", None)])
    report = harness.sync_named(GROUP)
    assert report.status == "succeeded", report.error
    assert _sent(receiver) == {
        "u1": {"open_tickets": 2, "plan": "pro", "last_ticket_at": "2026-11-01T10:00:00Z"},
        "u2": {"open_tickets": 0, "plan": "free", "last_ticket_at": None},
    }
    message = receiver.messages()[0]
    assert message["type"] == "identify"
    personas = message["context"]["personas"]
    assert personas["computation_class"] == "trait"
    assert personas["computation_key"] == KEY
    assert personas["computation_id"].startswith("trt_")

    receiver.reset()
    assert harness.sync_named(GROUP).status == "succeeded"
    assert receiver.messages() == []  # nothing changed, nothing sent

    _rows(harness, [("u1", 3, "pro", "2026-11-02T09:00:00Z"), ("u2", 0, "free", None)])
    receiver.reset()
    report = harness.sync_named(GROUP)
    assert _sent(receiver) == {
        "u1": {"open_tickets": 3, "plan": "pro", "last_ticket_at": "2026-11-02T09:00:00Z"}
    }
    assert report.destinations[0].changed == 1


def test_a_leaver_gets_nulls_once(harness: Harness, receiver: Receiver) -> None:
    _group(harness)
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u2", 1, "free", None)])
    receiver.reset()
    report = harness.sync_named(GROUP)
    assert report.status == "succeeded", report.error
    nulls = {"open_tickets": None, "plan": None, "last_ticket_at": None}
    assert _sent(receiver) == {"u1": nulls}
    receiver.reset()
    harness.sync_named(GROUP)
    assert receiver.messages() == []
    # Back with the values it had: the destination holds nulls, so they are sent again.
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    assert _sent(receiver) == {"u1": {"open_tickets": 2, "plan": "pro", "last_ticket_at": None}}


def test_on_exit_keep_sends_nothing_to_a_leaver(harness: Harness, receiver: Receiver) -> None:
    _group(harness, on_exit="keep")
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u2", 1, "free", None)])
    receiver.reset()
    assert harness.sync_named(GROUP).status == "succeeded"
    assert receiver.messages() == []
    # Back with the same values: the destination kept them, nothing to send.
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    assert receiver.messages() == []
    assert harness.memberships()["u1"].status == "in_sync"


def test_a_value_changed_twice_before_delivery_sends_only_the_latest(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness)
    _rows(harness, [("u1", 1, "free", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u1", 2, "pro", None)])
    harness.sync_named(GROUP, deliver=False)
    _rows(harness, [("u1", 3, "team", None)])
    receiver.reset()
    harness.sync_named(GROUP)
    assert [m["traits"] for m in receiver.messages()] == [
        {"open_tickets": 3, "plan": "team", "last_ticket_at": None}
    ]


def test_invalid_rows_are_explained_per_row(harness: Harness, receiver: Receiver) -> None:
    harness.warehouse_sql("CREATE TABLE scores (user_id TEXT, score REAL, blob BLOB, note TEXT)")
    _group(harness, query="SELECT user_id, score, blob, note FROM scores")
    harness.warehouse_sql(
        ("INSERT INTO scores VALUES (?, ?, ?, ?)", ("ok", 1.5, None, "fine")),
        ("INSERT INTO scores VALUES (?, ?, ?, ?)", ("nan", float("nan"), None, "x")),
        ("INSERT INTO scores VALUES (?, ?, ?, ?)", ("inf", float("inf"), None, "x")),
        ("INSERT INTO scores VALUES (?, ?, ?, ?)", ("raw", 1.0, b"\x00\xff", "x")),
        ("INSERT INTO scores VALUES (?, ?, ?, ?)", ("big", 1.0, None, "x" * 17_000)),
    )
    report = harness.sync_named(GROUP)
    assert report.status == "succeeded", report.error
    # SQLite stores NaN as NULL: that row is valid, with a null score.
    assert report.invalid == 3
    samples = "\n".join(report.invalid_samples)
    assert "user_id 'inf': trait score: inf is not a JSON number" in samples
    assert "user_id 'raw': trait blob: bytes are not a trait value" in samples
    assert "user_id 'big': its values are 17,035 bytes of JSON, over the limit of 16,384" in samples
    assert _sent(receiver) == {
        "ok": {"score": 1.5, "blob": None, "note": "fine"},
        "nan": {"score": None, "blob": None, "note": "x"},
    }
    stored = harness.runs()[-1].invalid_samples
    assert any("'raw'" in s for s in stored)


def test_a_column_that_is_not_a_key_fails_the_run_naming_it(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness, query='SELECT user_id, open_tickets AS \\"Open Tickets\\" FROM summary')
    _rows(harness, [("u1", 2, "pro", None)])
    report = harness.sync_named(GROUP)
    assert report.status == "failed"
    assert 'column "Open Tickets" cannot be a trait key' in str(report.error)
    assert "AS open_tickets" in str(report.error)
    assert receiver.messages() == []


def test_a_trait_named_like_an_audience_key_at_the_same_destination_fails(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness, query="SELECT user_id, 1 AS high_value_users FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    report = harness.sync_named(GROUP)
    assert report.status == "failed"
    assert 'is also the key of audience "High Value Users" at destination "segment"' in str(
        report.error
    )


def test_a_trait_group_cannot_take_a_key_of_an_audience(harness: Harness) -> None:
    from sync.errors import ConfigError

    harness.config_extra = (
        '[[traits]]\nname = "High Value Users"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    with pytest.raises(ConfigError, match="duplicate audience name"):
        harness.config()


def test_members_and_user_show_current_and_last_sent_values(
    harness: Harness, receiver: Receiver
) -> None:
    from click.testing import CliRunner

    from sync.cli import cli as main

    _group(harness)
    _rows(harness, [("u1", 2, "pro", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u1", 5, "pro", None)])
    harness.sync_named(GROUP, deliver=False)
    config = harness.write_config()
    runner = CliRunner()
    shown = runner.invoke(main, ["--config", str(config), "members", KEY, "--json"])
    assert shown.exit_code == 0, shown.output
    (member,) = json.loads(shown.output)
    assert member["value"] == {"open_tickets": 5, "plan": "pro", "last_ticket_at": None}
    assert member["synced"] == {"open_tickets": 2, "plan": "pro", "last_ticket_at": None}
    user = json.loads(runner.invoke(main, ["--config", str(config), "user", "u1", "--json"]).output)
    assert [(u["audience"], u["value"]["open_tickets"]) for u in user] == [(KEY, 5)]


def test_dry_run_plans_a_trait_group_without_writing(harness: Harness, receiver: Receiver) -> None:
    _group(harness)
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u1", 3, "pro", None)])
    receiver.reset()
    report = harness.sync_named(GROUP, dry_run=True)
    assert report.status == "planned"
    (entry,) = report.destinations
    assert (entry.changed, entry.removed, entry.pending) == (1, 1, 2)
    assert receiver.messages() == []
    assert (
        harness.memberships()["u1"].value == '{"last_ticket_at":null,"open_tickets":2,"plan":"pro"}'
    )


def test_the_removal_guard_stops_a_run_that_would_null_most_of_a_group(
    harness: Harness, receiver: Receiver
) -> None:
    harness.defaults.update(guard_min_members=2, max_removal_ratio=0.5)
    _group(harness)
    _rows(harness, [(f"u{i}", i, "pro", None) for i in range(4)])
    harness.sync_named(GROUP)
    _rows(harness, [("u0", 0, "pro", None)])
    receiver.reset()
    report = harness.sync_named(GROUP)
    assert report.status == "guarded"
    assert "would remove 3 of 4 members" in str(report.error)
    assert receiver.messages() == []
    assert harness.sync_named(GROUP, force=True).status == "succeeded"
    assert len(receiver.messages()) == 3


def test_retire_send_null_nulls_a_removed_group_s_members(
    harness: Harness, receiver: Receiver
) -> None:
    from click.testing import CliRunner

    from sync.cli import cli

    _group(harness)
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    harness.config_extra = ""  # the group is removed from the config
    config = harness.write_config()
    receiver.reset()
    runner = CliRunner()
    wrong = runner.invoke(cli, ["--config", str(config), "retire", KEY, "--send-false"])
    assert wrong.exit_code != 0 and "retire it with --send-null" in wrong.output
    done = runner.invoke(cli, ["--config", str(config), "retire", KEY, "--send-null"])
    assert done.exit_code == 0, done.output
    nulls = {"open_tickets": None, "plan": None, "last_ticket_at": None}
    assert _sent(receiver) == {"u1": nulls, "u2": nulls}


def test_a_renamed_trait_group_is_refused_and_an_orphan_named_with_send_null(
    harness: Harness, receiver: Receiver
) -> None:
    from sync.errors import ConfigDriftError
    from sync.run.drift import drift_warnings

    _group(harness)
    _rows(harness, [("u1", 2, "pro", None)])
    harness.sync_named(GROUP)
    harness.config_extra = harness.config_extra.replace(GROUP, "Help Desk Traits")
    with pytest.raises(ConfigDriftError, match='looks like "support_traits" renamed'):
        harness.sync_named("Help Desk Traits")
    harness.config_extra = ""
    with harness.engine.connect() as connection:
        (line,) = drift_warnings(connection, harness.config(), warn_orphans=True)
    assert line.startswith('trait group "support_traits" was removed from the config')
    assert "retire support_traits --send-null" in line


def test_a_member_whose_row_turns_invalid_keeps_its_values(
    harness: Harness, receiver: Receiver
) -> None:
    """An unusable value is the row's problem, not a reason to null the member's traits."""
    harness.warehouse_sql("CREATE TABLE scores (user_id TEXT, score REAL, note TEXT)")
    _group(harness, query="SELECT user_id, score, note FROM scores")
    harness.warehouse_sql(
        ("INSERT INTO scores VALUES (?, ?, ?)", ("u1", 1.5, "a")),
        ("INSERT INTO scores VALUES (?, ?, ?)", ("u2", 2.5, "b")),
    )
    harness.sync_named(GROUP)
    harness.warehouse_sql(
        ("UPDATE scores SET score = ? WHERE user_id = 'u1'", (float("inf"),)),
        ("INSERT INTO scores VALUES (?, ?, ?)", ("u3", float("-inf"), "c")),
    )
    receiver.reset()
    report = harness.sync_named(GROUP)
    assert report.status == "succeeded", report.error
    assert report.invalid == 2 and report.destinations[0].removed == 0
    assert receiver.messages() == []  # u1 keeps 1.5; u3 is not sent a half row
    assert harness.memberships()["u1"].value == '{"note":"a","score":1.5}'
    assert "u3" not in harness.memberships()
    harness.warehouse_sql("UPDATE scores SET score = 3.5 WHERE user_id IN ('u1', 'u3')")
    harness.sync_named(GROUP)
    assert _sent(receiver) == {"u1": {"score": 3.5, "note": "a"}, "u3": {"score": 3.5, "note": "c"}}


def test_two_groups_first_synced_at_once_never_both_send_one_trait(
    harness: Harness, receiver: Receiver
) -> None:
    """Group B's first run happens inside group A's (before A has recorded its traits): B
    sends, A finds the clash before planning and fails naming B (hostile review: both sent
    "plan")."""
    from sync.engine import RunHooks

    harness.warehouse_sql(
        "CREATE TABLE a (user_id TEXT, plan TEXT)", "CREATE TABLE b (user_id TEXT, plan TEXT)"
    )
    harness.warehouse_sql(
        "INSERT INTO a VALUES ('u1', 'pro')", "INSERT INTO b VALUES ('u1', 'team')"
    )
    harness.config_extra = "".join(
        f'[[traits]]\nname = "{name}"\nsource = "warehouse"\nquery = "SELECT * FROM {table}"\n'
        'destinations = ["segment"]\n'
        for name, table in (("Group A", "a"), ("Group B", "b"))
    )
    inner: list[Any] = []

    def run_b_once() -> None:
        if not inner:
            inner.append(None)
            inner.append(harness.sync_named("Group B"))

    harness.hooks = RunHooks(after_chunk=run_b_once)
    first = harness.sync_named("Group A")
    assert inner[1].status == "succeeded"
    assert first.status == "failed"
    assert 'column "plan" is also the key of trait group "Group B"' in str(first.error)
    assert [m["traits"] for m in receiver.messages()] == [{"plan": "team"}]
    # The loser's refused claim is not left recorded: B, which holds "plan", goes on.
    harness.hooks = RunHooks()
    harness.warehouse_sql("UPDATE b SET plan = 'free'")
    again = harness.sync_named("Group B")
    assert again.status == "succeeded", again.error
    assert harness.sync_named("Group A").status == "failed"


def test_a_trait_named_like_an_audience_s_extra_trait_fails(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness, query="SELECT user_id, plan AS email FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    report = harness.sync_named(GROUP)
    assert report.status == "failed"
    assert 'a trait sent with audience "High Value Users"' in str(report.error)


@pytest.mark.parametrize(
    ("column", "alias"),
    [("Open Tickets", "AS open_tickets"), ("user_ID", "AS trait_user_id"), ("2fa", "AS trait_2fa")],
)
def test_a_bad_column_name_gets_an_alias_that_is_a_trait(column: str, alias: str) -> None:
    from sync.errors import SourceError
    from sync.run.trait_values import TraitColumns

    with pytest.raises(SourceError, match=alias):
        TraitColumns("G").indexes(["user_id", column])


def test_a_key_of_another_table_is_refused_without_suggesting_itself(harness: Harness) -> None:
    from sync.errors import ConfigError

    _group(harness)
    harness.config_extra += "[traits.destination_settings.segment]\nexternal_audience_id = 'x'\n"
    with pytest.raises(ConfigError, match=r"unknown key here \(another table takes it\)"):
        harness.config()


def test_an_audience_added_later_cannot_take_a_trait_a_group_already_sends(
    harness: Harness, receiver: Receiver
) -> None:
    """One namespace of keys per destination: a trait group sends `vip`; an audience named
    "VIP" added afterwards is refused before it sends (naming the group), and the group, which
    held the name first, goes on. The audience used to overwrite the trait at the destination
    and the group failed on every later run (hostile review)."""
    _group(harness, query="SELECT user_id, plan, 1 AS vip FROM summary")
    _rows(harness, [("u1", 2, "pro", None), ("u2", 0, "free", None)])
    harness.set_members(["u1"])
    assert harness.sync_named(GROUP).status == "succeeded"
    receiver.reset()
    harness.config_extra += (
        '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    refused = harness.sync_named("VIP")
    assert refused.status == "failed"
    assert 'its key "vip" is a trait that trait group "Support Traits" already sends' in str(
        refused.error
    )
    assert 'destination "segment"' in str(refused.error)
    assert receiver.messages() == []
    from click.testing import CliRunner

    from sync.cli import cli as main

    probe = CliRunner().invoke(main, ["--config", str(harness.write_config()), "check", "--probe"])
    assert probe.exit_code == 1, probe.output
    assert 'its key "vip" is a trait that trait group "Support Traits"' in probe.output
    _rows(harness, [("u1", 2, "team", None), ("u2", 0, "free", None)])
    again = harness.sync_named(GROUP)
    assert again.status == "succeeded", again.error
    assert _sent(receiver) == {"u1": {"plan": "team", "vip": 1}}


def test_an_audience_whose_key_a_group_sent_only_before_it_keeps_its_key(
    harness: Harness, receiver: Receiver
) -> None:
    """The audience that holds its key at the destination (it has sent there) is not refused
    because a trait group later recorded that name: the group is the one that fails."""
    harness.set_members(["u1"])
    assert harness.sync().status == "succeeded"
    _group(harness, query="SELECT user_id, 1 AS high_value_users FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "failed"
    harness.set_members(["u1", "u2"])
    report = harness.sync()
    assert report.status == "succeeded", report.error


def test_a_dry_run_of_an_audience_that_would_take_a_group_s_trait_says_so(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness, query="SELECT user_id, 1 AS vip FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra += (
        '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    from click.testing import CliRunner

    from sync.cli import cli as main

    config = str(harness.write_config())
    dry = CliRunner().invoke(main, ["--config", config, "sync", "VIP", "--dry-run"])
    assert dry.exit_code == 1, dry.output
    assert 'its key "vip" is a trait that trait group "Support Traits"' in dry.output


def test_retire_send_null_also_nulls_what_a_keep_group_s_leavers_hold(
    harness: Harness, receiver: Receiver
) -> None:
    """With on_exit = "keep" a leaver keeps its values at the destination; retiring the group
    with --send-null nulled current members only, so past leavers kept the group's values
    while `status` said retired (hostile review). A leaver never sent anything gets nothing."""
    from click.testing import CliRunner

    from sync.cli import cli

    _group(harness, on_exit="keep")
    _rows(harness, [("u1", 2, "pro", None), ("u2", 1, "free", None)])
    harness.sync_named(GROUP)
    _rows(harness, [("u1", 2, "pro", None)])  # u2 leaves and keeps its values
    harness.sync_named(GROUP)
    harness.config_extra = ""
    config = harness.write_config()
    receiver.reset()
    done = CliRunner().invoke(cli, ["--config", str(config), "retire", KEY, "--send-null"])
    assert done.exit_code == 0, done.output
    nulls = {"open_tickets": None, "plan": None, "last_ticket_at": None}
    assert _sent(receiver) == {"u1": nulls, "u2": nulls}


def test_a_trait_group_s_query_error_calls_it_a_trait_group(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness, query="SELECT user_id, nope FROM summary")
    report = harness.sync_named(GROUP)
    assert report.status == "failed"
    assert str(report.error).startswith(f'trait group "{GROUP}": query failed on source'), (
        report.error
    )
    _group(harness, query="SELECT plan FROM summary")
    report = harness.sync_named(GROUP)
    assert str(report.error).startswith(f'trait group "{GROUP}": the query'), report.error


def test_an_audience_that_starts_carrying_a_group_s_trait_is_refused(
    harness: Harness, receiver: Receiver
) -> None:
    """An audience that has sent its key may not start carrying a trait a group already
    sends: having sent its key says nothing about a trait it never carried (second review:
    it overwrote the group's `email`, and the group failed every run after)."""
    harness.audience["traits"] = []
    harness.audience["query"] = "SELECT user_id FROM members"
    harness.set_members(["u1"])
    assert harness.sync().status == "succeeded"
    _group(harness, query="SELECT user_id, plan, plan || '@g.example' AS email FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    receiver.reset()
    harness.audience["traits"] = ["email"]
    harness.audience["query"] = "SELECT user_id, email FROM members"
    harness.set_members(["u1", "u2"])
    refused = harness.sync()
    assert refused.status == "failed"
    assert 'the trait "email" it carries is a trait that trait group "Support Traits"' in str(
        refused.error
    )
    assert receiver.messages() == []
    _rows(harness, [("u1", 2, "team", None)])
    group = harness.sync_named(GROUP)
    assert group.status == "succeeded", group.error


def test_a_trait_group_s_moved_endpoint_is_refused_as_a_trait_group_s(
    harness: Harness, receiver: Receiver
) -> None:
    _group(harness)
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    from sync.errors import ConfigDriftError

    harness.destinations["segment"]["endpoint"] = receiver.url + "/elsewhere"
    with pytest.raises(ConfigDriftError) as refused:
        harness.sync_named(GROUP)
    assert str(refused.value).startswith(f'trait group "{KEY}": destination "segment" now points')


def test_a_group_that_adds_a_destination_cannot_take_an_audience_s_key_there(
    harness: Harness, receiver: Receiver, tmp_path: Any
) -> None:
    """Who was first is judged per destination: a group that sent `vip` to one destination
    and adds another where audience "VIP" has sent its key is refused there, and the audience
    goes on (third review: the group overwrote the audience's key, and the audience was
    refused forever)."""
    harness.destinations["f"] = {"type": "file", "path": str(tmp_path / "f.jsonl")}
    harness.warehouse_sql("CREATE TABLE tiers (user_id TEXT, vip TEXT)")
    harness.warehouse_sql("INSERT INTO tiers VALUES ('u1', 'gold')")
    group = '[[traits]]\nname = "Tiers"\nsource = "warehouse"\nquery = "SELECT * FROM tiers"\n'
    audience = (
        '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    harness.set_members(["u1", "u2"])
    harness.config_extra = audience + group + 'destinations = ["f"]\n'
    assert harness.sync_named("VIP").status == "succeeded"
    assert harness.sync_named("Tiers").status == "succeeded"
    receiver.reset()
    harness.config_extra = audience + group + 'destinations = ["f", "segment"]\n'
    refused = harness.sync_named("Tiers")
    assert refused.status == "failed"
    assert 'column "vip" is also the key of audience "VIP" at destination "segment"' in str(
        refused.error
    )
    assert receiver.messages() == []
    harness.set_members(["u1", "u2", "u3"])
    assert harness.sync_named("VIP").status == "succeeded"


def test_a_group_cannot_take_the_key_of_an_audience_removed_but_not_retired(
    harness: Harness, receiver: Receiver
) -> None:
    """An audience removed from the config still holds its key where it sent it until it is
    retired: a group's column of that name is refused (third review: the group took it, then
    `retire KEY --send-false`, as the drift warning advises, overwrote the group's values)."""
    harness.set_members(["u1"])
    assert harness.sync().status == "succeeded"
    harness.audience["name"] = "Someone Else"
    harness.audience["destinations"] = ["segment"]
    _group(harness, query="SELECT user_id, plan AS high_value_users FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    refused = harness.sync_named(GROUP)
    assert refused.status == "failed"
    assert 'column "high_value_users" is also the key of audience "High Value Users"' in str(
        refused.error
    )
    assert "removed from the config" in str(refused.error)


def test_a_group_takes_a_retired_audience_s_key_only_when_allowed(
    harness: Harness, receiver: Receiver
) -> None:
    """A retired audience's key stays reserved (DESIGN: one namespace of keys per destination
    across audiences and trait columns; a retired key is not reused unless allowed): a trait
    column of that name took it without `allow_key_reuse`, so the destination's `true`/`false`
    trait silently took another meaning."""
    harness.set_members(["u1"])
    assert harness.sync().status == "succeeded"
    harness.audience["name"] = "Someone Else"
    harness.audience["destinations"] = ["segment"]
    from click.testing import CliRunner

    from sync.cli import cli

    config = harness.write_config()
    retired = CliRunner().invoke(
        cli, ["--config", str(config), "retire", "high_value_users", "--send-false"]
    )
    assert retired.exit_code == 0, retired.output
    _group(harness, query="SELECT user_id, plan AS high_value_users FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    receiver.reset()
    refused = harness.sync_named(GROUP)
    assert refused.status == "failed"
    error = str(refused.error)
    assert 'column "high_value_users" is also the key of the retired audience' in error, error
    assert "allow_key_reuse = true" in error and "\n" not in error
    assert receiver.messages() == []
    harness.config_extra += "allow_key_reuse = true\n"
    assert harness.sync_named(GROUP).status == "succeeded"
    assert _sent(receiver) == {"u1": {"high_value_users": "pro"}}


def test_a_column_dropped_from_a_group_s_query_is_warned_about_once(
    harness: Harness, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A column removed from a trait group's query is not nulled at the destination (README);
    the run that drops it said nothing, so members kept a stale trait unnoticed."""
    import logging

    _group(harness)
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    _group(harness, query="SELECT user_id, open_tickets, last_ticket_at FROM summary")
    with caplog.at_level(logging.WARNING, logger="sync"):
        assert harness.sync_named(GROUP).status == "succeeded"
        assert harness.sync_named(GROUP).status == "succeeded"
    said = [r.getMessage() for r in caplog.records if "left its query" in r.getMessage()]
    assert len(said) == 1, said
    assert f'trait group "{GROUP}"' in said[0] and '"plan"' in said[0]
    assert "NULL AS plan" in said[0]


def test_retire_refusals_name_a_trait_group_a_trait_group(
    harness: Harness, receiver: Receiver
) -> None:
    from click.testing import CliRunner

    from sync.cli import cli

    _group(harness)
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    runner = CliRunner()
    still = runner.invoke(cli, ["--config", str(harness.write_config()), "retire", KEY])
    assert f'trait group "{KEY}" is still in the config' in still.output, still.output
    lists = runner.invoke(
        cli, ["--config", str(harness.write_config()), "retire", KEY, "--destination", "segment"]
    )
    assert f'trait group "{KEY}" still lists destination "segment"' in lists.output, lists.output
    harness.config_extra = ""
    config = str(harness.write_config())
    assert runner.invoke(cli, ["--config", config, "retire", KEY]).exit_code == 0
    again = runner.invoke(cli, ["--config", config, "retire", KEY])
    assert f'trait group "{KEY}" is already retired' in again.output, again.output


def test_a_group_cannot_take_a_key_an_audience_still_holds_where_it_dropped_it(
    harness: Harness, receiver: Receiver, tmp_path: Any
) -> None:
    """An audience that no longer lists a destination still holds its key there until it is
    retired there (fourth review: a group took `vip` there, then `retire vip --destination b
    --send-false` overwrote the group's values)."""
    harness.destinations["b"] = {"type": "file", "path": str(tmp_path / "b.jsonl")}
    harness.warehouse_sql("CREATE TABLE tiers (user_id TEXT, vip TEXT)")
    harness.warehouse_sql("INSERT INTO tiers VALUES ('u1', 'gold')")
    audience = (
        '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\n'
    )
    group = (
        '[[traits]]\nname = "Tiers"\nsource = "warehouse"\nquery = "SELECT * FROM tiers"\n'
        'destinations = ["b"]\n'
    )
    harness.set_members(["u1"])
    harness.config_extra = audience + 'destinations = ["segment", "b"]\n'
    assert harness.sync_named("VIP").status == "succeeded"
    harness.config_extra = audience + 'destinations = ["segment"]\n' + group
    refused = harness.sync_named("Tiers")
    assert refused.status == "failed"
    assert 'also the key of audience "VIP" at destination "b"' in str(refused.error)
    assert "retire vip --destination b --send-false" in str(refused.error)


def test_a_removed_group_s_traits_stay_its_own_until_it_is_retired(
    harness: Harness, receiver: Receiver
) -> None:
    """A group removed from the config but not retired still holds its traits where it sent
    them: another group's column or an audience's key of that name is refused until it is
    retired (fourth review: on_removed = "retire" then nulled the new group's values)."""
    harness.warehouse_sql("CREATE TABLE t (user_id TEXT, plan TEXT)")
    harness.warehouse_sql("INSERT INTO t VALUES ('u1', 'pro')")
    old = '[[traits]]\nname = "G1"\nsource = "warehouse"\nquery = "SELECT * FROM t"\n'
    new = (
        '[[traits]]\nname = "G2"\nsource = "warehouse"\n'
        'query = "SELECT * FROM t WHERE plan IS NOT NULL"\n'
    )
    harness.config_extra = old + 'destinations = ["segment"]\n'
    assert harness.sync_named("G1").status == "succeeded"
    harness.config_extra = new + 'destinations = ["segment"]\n'
    refused = harness.sync_named("G2")
    assert refused.status == "failed"
    assert 'also the key of trait group "G1"' in str(refused.error)
    assert "removed from the config" in str(refused.error)
    harness.config_extra = (
        '[[audiences]]\nname = "Plan"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    audience = harness.sync_named("Plan")
    assert audience.status == "failed"
    assert 'is a trait of trait group "g1"' in str(audience.error).lower()
    assert "retire g1 --send-null" in str(audience.error)


def _replace_g1_by_g2(harness: Harness, before: str = "") -> None:
    """Trait group G1 synced (u1's plan "pro"), then replaced in the config by G2, which sends
    the same trait name (`plan`, upper case); ``before`` goes ahead of it in the config."""
    harness.warehouse_sql("CREATE TABLE t (user_id TEXT, plan TEXT)")
    harness.warehouse_sql("INSERT INTO t VALUES ('u1', 'pro')")
    harness.config_extra = (
        '[[traits]]\nname = "G1"\nsource = "warehouse"\nquery = "SELECT * FROM t"\n'
        'destinations = ["segment"]\n'
    )
    assert harness.sync_named("G1").status == "succeeded"
    harness.config_extra = before + (
        '[[traits]]\nname = "G2"\nsource = "warehouse"\n'
        'query = "SELECT user_id, upper(plan) AS plan FROM t"\ndestinations = ["segment"]\n'
    )


def test_on_removed_retire_frees_a_removed_group_s_traits_before_the_new_group_runs(
    harness: Harness, receiver: Receiver
) -> None:
    """With on_removed = "retire", a group replacing a removed one under the same trait names
    failed in the sync that retired the old one (computations ran first, orphans after) and
    worked only in the next; the nulls now go first, then the new group's values."""
    from click.testing import CliRunner

    from sync.cli import cli

    harness.defaults.update(on_removed="retire")
    _replace_g1_by_g2(harness)
    receiver.reset()
    result = CliRunner().invoke(cli, ["--config", str(harness.write_config()), "sync"])
    assert result.exit_code == 0, result.output
    plans = [m["traits"]["plan"] for m in receiver.messages() if "plan" in m["traits"]]
    assert plans == [None, "PRO"]
    assert receiver.state[("u1", "plan")] == "PRO"


def test_the_daemon_retires_a_removed_group_before_its_successor_first_runs(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """The daemon ran every computation at start and retired orphans at its first sweep only:
    the group taking over a removed group's trait names failed at start, the old group's nulls
    went out at the sweep, and the new values waited for the next schedule (an hour here),
    the destination holding null meanwhile (second hostile review)."""
    import signal

    from tests.processes import spawn, wait_for

    harness.defaults.update(on_removed="retire", schedule="1h")
    _replace_g1_by_g2(harness, before='[daemon]\nhttp = ""\n')
    daemon = spawn(harness.write_config(), "run", log=tmp_path / "daemon.log")
    try:
        wait_for(lambda: receiver.state.get(("u1", "plan")) == "PRO", 30, "the new group's value")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=40)
    plans = [m["traits"]["plan"] for m in receiver.messages() if "plan" in m["traits"]]
    assert plans == ["pro", None, "PRO"], plans
    log = (tmp_path / "daemon.log").read_text()
    assert 'trait group "g1" removed from the config: retired after sending nulls' in log, log


def test_a_group_s_dry_run_reads_who_holds_a_name_from_the_state_db(
    harness: Harness, receiver: Receiver
) -> None:
    """The dry run judged a group's columns on its scratch copy, which has no memberships: a
    group holding `vip` failed its dry run naming the audience it had refused, while its real
    run succeeded (fourth review)."""
    from click.testing import CliRunner

    from sync.cli import cli

    _group(harness, query="SELECT user_id, plan, 1 AS vip FROM summary")
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra += (
        '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    config = str(harness.write_config())
    dry = CliRunner().invoke(cli, ["--config", config, "sync", GROUP, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "planned" in dry.output


def test_a_group_retired_without_nulls_keeps_its_traits_from_others(
    harness: Harness, receiver: Receiver
) -> None:
    """A trait group retired without --send-null leaves its values at the destination: a new
    group taking its trait for some users mixed the two groups' values there, and an audience
    could take the trait as its key (hostile review). They are refused without
    allow_key_reuse; retired with its nulls, the names are free."""
    from click.testing import CliRunner

    from sync.cli import cli

    _replace_g1_by_g2(harness)
    runner = CliRunner()
    config = str(harness.write_config())
    assert runner.invoke(cli, ["--config", config, "retire", "g1"]).exit_code == 0
    refused = harness.sync_named("G2")
    assert refused.status == "failed"
    assert 'the trait group "G1", retired without --send-null' in str(refused.error)
    assert "allow_key_reuse = true" in str(refused.error)
    allowed = harness.config_extra + "allow_key_reuse = true\n"
    plan = (
        '[[audiences]]\nname = "Plan"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    harness.config_extra = plan
    audience = harness.sync_named("Plan")
    assert audience.status == "failed"
    assert 'its key "plan" was a key of the trait group "G1"' in str(audience.error)
    harness.config_extra = allowed
    assert harness.sync_named("G2").status == "succeeded"
    assert receiver.state[("u1", "plan")] == "PRO"


def test_an_audience_cannot_carry_a_retired_audience_s_key(
    harness: Harness, receiver: Receiver
) -> None:
    """After `retire pro_users --send-false`, a new audience carrying `traits = ["pro_users"]`
    sent that name with other values (hostile review): refused without allow_key_reuse."""
    from click.testing import CliRunner

    from sync.cli import cli

    harness.warehouse_sql("CREATE TABLE t (user_id TEXT, pro_users TEXT)")
    harness.warehouse_sql("INSERT INTO t VALUES ('u1', 'pro')")
    harness.set_members(["u1"])
    pro = (
        '[[audiences]]\nname = "Pro Users"\nsource = "warehouse"\n'
        'query = "SELECT user_id FROM members"\ndestinations = ["segment"]\n'
    )
    harness.config_extra = pro
    assert harness.sync_named("Pro Users").status == "succeeded"
    harness.config_extra = ""
    config = str(harness.write_config())
    retired = CliRunner().invoke(cli, ["--config", config, "retire", "pro_users", "--send-false"])
    assert retired.exit_code == 0, retired.output
    harness.config_extra = (
        '[[audiences]]\nname = "Plans"\nsource = "warehouse"\n'
        'query = "SELECT user_id, pro_users FROM t"\ntraits = ["pro_users"]\n'
        'destinations = ["segment"]\n'
    )
    refused = harness.sync_named("Plans")
    assert refused.status == "failed"
    assert 'the trait "pro_users" it carries was a key of the retired audience' in str(
        refused.error
    )
    harness.config_extra += "allow_key_reuse = true\n"
    assert harness.sync_named("Plans").status == "succeeded"


def _retire(harness: Harness, *arguments: str) -> str:
    from click.testing import CliRunner

    from sync.cli import cli

    config = str(harness.write_config())
    result = CliRunner().invoke(cli, ["--config", config, "retire", *arguments])
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_a_key_retired_at_one_destination_stays_reserved_there(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """`retire KEY --destination D` forgot the audience's rows at D, and with them the only
    record that D's profiles hold its key: a trait group at D then took a column of that name
    without `allow_key_reuse`, so D's true/false trait silently took another meaning (README
    said "not covered"; DESIGN: a retired key is not reused unless allowed)."""
    out = tmp_path / "preview.jsonl"
    harness.destinations["preview"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["segment", "preview"]
    harness.set_members(["u1"])
    assert harness.sync().status == "succeeded"
    harness.audience["destinations"] = ["segment"]
    _retire(harness, "high_value_users", "--destination", "preview", "--send-false")
    harness.warehouse_sql("CREATE TABLE summary (user_id TEXT, plan TEXT)")
    harness.warehouse_sql("INSERT INTO summary VALUES ('u1', 'pro')")
    harness.config_extra = (
        f'[[traits]]\nname = "{GROUP}"\nsource = "warehouse"\ndestinations = ["preview"]\n'
        'query = "SELECT user_id, plan AS high_value_users FROM summary"\n'
    )
    out.write_text("")
    refused = harness.sync_named(GROUP)
    assert refused.status == "failed"
    error = str(refused.error)
    assert 'column "high_value_users" is also the key of ' in error, error
    assert '"High Value Users"' in error and 'destination "preview"' in error, error
    assert "allow_key_reuse = true" in error and "\n" not in error, error
    assert out.read_text() == ""
    # The audience still sends its key elsewhere, and may list the destination again.
    assert harness.sync().status == "succeeded"
    harness.config_extra += "allow_key_reuse = true\n"
    assert harness.sync_named(GROUP).status == "succeeded"
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(m["userId"], m["traits"]) for m in sent] == [("u1", {"high_value_users": "pro"})]


@pytest.mark.parametrize("nulls", [False, True])
def test_a_group_retired_at_one_destination_keeps_its_traits_there_unless_nulled(
    harness: Harness, receiver: Receiver, tmp_path: Path, nulls: bool
) -> None:
    """A trait group retired at one destination without --send-null leaves its values there:
    an audience named like one of its traits took that name at that destination (README said
    "not covered"). Retired with its nulls, the names are free, as for a whole group."""
    out = tmp_path / "preview.jsonl"
    harness.destinations["preview"] = {"type": "file", "path": str(out)}
    _group(harness)
    harness.config_extra = harness.config_extra.replace(
        'destinations = ["segment"]', 'destinations = ["segment", "preview"]'
    )
    _rows(harness, [("u1", 2, "pro", None)])
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra = harness.config_extra.replace(
        'destinations = ["segment", "preview"]', 'destinations = ["segment"]'
    )
    _retire(harness, KEY, "--destination", "preview", *(["--send-null"] if nulls else []))
    harness.audience["name"] = "Plan"  # its key, plan, is one of the group's traits
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["u1"])
    report = harness.sync_named("Plan")
    if nulls:
        assert report.status == "succeeded", report.error
        return
    assert report.status == "failed"
    error = str(report.error)
    assert 'its key "plan" was a key of ' in error and f'"{GROUP}"' in error, error
    assert 'destination "preview"' in error and "allow_key_reuse = true" in error, error
