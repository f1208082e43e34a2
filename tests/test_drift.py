"""Config drift: a renamed audience, a removed one, a dropped destination, a moved endpoint.

Each is what an operator does by editing the config; none may leave `true`s at a destination
silently. Everything goes through the CLI, as a user would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from sync.cli import cli
from sync.destinations import SegmentSettings, WebhookSettings
from tests.harness import WRITE_KEY, Harness
from tests.receiver import Receiver

KEY = "high_value_users"
OTHER = "churned"
CHURNED = """
[[audiences]]
name = "Churned"
source = "warehouse"
query = "SELECT user_id FROM members WHERE user_id LIKE 'c%'"
destinations = ["segment"]
"""


def invoke(config: Path, *args: str) -> tuple[int, str]:
    """Exit code and everything printed (stdout and the log lines on stderr)."""
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    return result.exit_code, result.output


def lines_with(output: str, *needles: str) -> list[str]:
    return [line for line in output.splitlines() if all(n in line for n in needles)]


def states(config: Path) -> dict[tuple[str, str | None], dict[str, Any]]:
    code, output = invoke(config, "status", "--json")
    assert code == 0, output
    return {(r["key"], r["destination"]): r for r in json.loads(output)}


# --- rename ----------------------------------------------------------------------------------


def test_a_rename_is_refused_naming_both_keys_until_key_keeps_it(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    receiver.reset()
    harness.audience["name"] = "Big Spenders"
    config = harness.write_config()
    for command in (["sync"], ["sync", "--dry-run"], ["run", "--once"], ["check"]):
        code, output = invoke(config, *command)
        assert code == 1, (command, output)
        refused = lines_with(output, '"big_spenders"', f'"{KEY}"', f'key = "{KEY}"')
        assert len(refused) == 1, (command, output)
        assert f"audience-sync retire {KEY} --send-false" in refused[0]
    assert receiver.messages() == []
    # The first way out: keep the key. Nothing is new, so nothing is sent.
    _keep_the_old_key(harness, receiver)


def _keep_the_old_key(harness: Harness, receiver: Receiver) -> None:
    """`key = "old"` on a refused rename: it syncs, sends nothing, and the key is active."""
    harness.audience["key"] = KEY
    config = harness.write_config()
    code, output = invoke(config, "sync")
    assert code == 0, output
    assert receiver.messages() == []
    assert states(config)[(KEY, "segment")]["state"] == "active"


def test_a_rename_is_accepted_once_the_old_key_is_retired(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.audience["name"] = "Big Spenders"
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 1
    receiver.reset()
    code, output = invoke(config, "retire", KEY, "--send-false")
    assert code == 0, output
    code, output = invoke(config, "sync")
    assert code == 0, output
    assert {k: v for k, v in receiver.state.items() if k[1] != "email"} == {
        ("a", KEY): False,
        ("b", KEY): False,
        ("a", "big_spenders"): True,
        ("b", "big_spenders"): True,
    }


def test_on_removed_retire_does_not_retire_what_a_refused_rename_still_needs(
    harness: Harness, receiver: Receiver
) -> None:
    """With on_removed = "retire", a renamed small audience was refused as a rename ("set key =
    old to keep it") and, in the same sync, its old key retired with false sent to everyone:
    the way out the refusal named no longer worked, and every member had flickered to false."""
    harness.defaults.update(on_removed="retire")
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    receiver.reset()
    harness.audience["name"] = "Big Spenders"
    config = harness.write_config()
    for command in (["sync"], ["run", "--once"]):
        code, output = invoke(config, *command)
        assert code == 1, (command, output)
        assert lines_with(output, '"big_spenders"', f'key = "{KEY}"'), (command, output)
        assert receiver.messages() == [], command
        assert lines_with(output, f'"{KEY}"', "not retired", '"big_spenders"'), (command, output)
        assert states(config)[(KEY, "segment")]["state"] == "orphaned"
    _keep_the_old_key(harness, receiver)


def test_on_removed_retire_keeps_every_copy_renamed_at_once(
    harness: Harness, receiver: Receiver
) -> None:
    """Two audiences of one definition renamed in one edit: both new names matched the first
    old key only, so the second old key was retired with false sent to every member (second
    hostile review)."""
    harness.defaults.update(on_removed="retire")
    harness.set_members(["a", "b"])
    copy = '[[audiences]]\nname = "{name}"\nsource = "warehouse"\nquery = "{query}"\n'
    query = harness.audience["query"]
    harness.config_extra = copy.format(name="Copy", query=query) + (
        'traits = ["email"]\ndestinations = ["segment"]\n'
    )
    assert invoke(harness.write_config(), "sync")[0] == 0
    receiver.reset()
    harness.audience["name"] = "Renamed One"
    harness.config_extra = harness.config_extra.replace('"Copy"', '"Renamed Copy"')
    code, output = invoke(harness.write_config(), "sync")
    assert code == 1, output
    assert receiver.messages() == []
    assert lines_with(output, '"copy"', "not retired"), output


def test_a_new_audience_unlike_any_removed_one_is_not_a_rename(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.config_extra = CHURNED.replace('"Churned"', '"Lapsed"').replace("'c%'", "'a%'")
    code, output = invoke(harness.write_config(), "sync")
    assert code == 0, output
    assert receiver.state[("a", "lapsed")] is True


# --- removal ---------------------------------------------------------------------------------


def test_a_removed_audience_is_warned_about_on_every_run_and_shown_orphaned(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "c1", "c2"])
    harness.config_extra = CHURNED
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.config_extra = ""
    config = harness.write_config()
    receiver.reset()
    for command in (["sync"], ["sync", KEY], ["run", "--once"]):
        code, output = invoke(config, *command)
        assert code == 0, (command, output)
        warned = lines_with(output, f'"{OTHER}"', f"audience-sync retire {OTHER} --send-false")
        assert len(warned) == 1, (command, output)
    assert receiver.messages() == []  # "warn" sends nothing
    assert states(config)[(OTHER, "segment")]["state"] == "orphaned"


def test_on_removed_retire_sends_false_to_everyone_guarded_over_the_ratio(
    harness: Harness, receiver: Receiver
) -> None:
    harness.defaults.update(on_removed="retire", guard_min_members=2, max_removal_ratio=0.5)
    harness.set_members(["a", "c1", "c2", "c3"])
    harness.config_extra = CHURNED
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.config_extra = ""
    config = harness.write_config()
    receiver.reset()
    code, output = invoke(config, "sync")
    assert code == 1, output
    assert lines_with(output, f'"{OTHER}"', "max_removal_ratio", "--force")
    assert receiver.messages() == []
    assert states(config)[(OTHER, "segment")]["state"] == "orphaned"
    code, output = invoke(config, "sync", "--force")
    assert code == 0, output
    sent = {(m["userId"], k): v for m in receiver.messages() for k, v in m["traits"].items()}
    assert sent == {("c1", OTHER): False, ("c2", OTHER): False, ("c3", OTHER): False}
    assert states(config)[(OTHER, "segment")]["state"] == "retired"
    receiver.reset()
    code, output = invoke(config, "sync")
    assert code == 0, output
    assert not lines_with(output, f'"{OTHER}"') and receiver.messages() == []


def test_the_daemon_retires_a_removed_audience_under_the_guard(
    harness: Harness, receiver: Receiver
) -> None:
    """Below `guard_min_members` an orphan is retired without --force, by `run` too."""
    harness.defaults.update(on_removed="retire")
    harness.set_members(["a", "c1", "c2"])
    harness.config_extra = CHURNED
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.config_extra = ""
    config = harness.write_config()
    receiver.reset()
    code, output = invoke(config, "run", "--once")
    assert code == 0, output
    assert receiver.state[("c1", OTHER)] is False and receiver.state[("c2", OTHER)] is False
    assert states(config)[(OTHER, "segment")]["state"] == "retired"


def test_the_daemon_sweep_retires_a_removed_audience(harness: Harness, receiver: Receiver) -> None:
    """A daemon that keeps running applies on_removed on its sweep, not only at start."""
    from sync.scheduler import Daemon

    harness.defaults.update(on_removed="retire")
    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.config_extra = ""
    daemon = Daemon(harness.config(), harness.engine)
    daemon.sweep()
    assert receiver.state[("c1", OTHER)] is False
    assert states(harness.write_config())[(OTHER, "segment")]["state"] == "retired"
    assert daemon.failures == 0


def test_a_named_or_dry_sync_only_warns_about_a_removed_audience(
    harness: Harness, receiver: Receiver
) -> None:
    harness.defaults.update(on_removed="retire")
    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.config_extra = ""
    config = harness.write_config()
    receiver.reset()
    for command in (["sync", KEY], ["sync", "--dry-run"]):
        code, output = invoke(config, *command)
        assert code == 0, (command, output)
        assert len(lines_with(output, f'"{OTHER}"', "on_removed")) == 1, output
    assert receiver.messages() == []
    assert states(config)[(OTHER, "segment")]["state"] == "orphaned"


# --- dropped destination ---------------------------------------------------------------------


def test_a_dropped_destination_is_warned_about_and_retired_with_send_false(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    harness.destinations["preview"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["segment", "preview"]
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.audience["destinations"] = ["segment"]
    config = harness.write_config()
    command = f"audience-sync retire {KEY} --destination preview --send-false"
    for _ in range(2):
        code, output = invoke(config, "sync")
        assert code == 0, output
        assert len(lines_with(output, f'"{KEY}"', '"preview"', command)) == 1, output
    assert states(config)[(KEY, "preview")]["members"] == 2
    out.write_text("")
    code, output = invoke(config, "retire", KEY, "--destination", "preview", "--send-false")
    assert code == 0, output
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(m["userId"], m["traits"][KEY]) for m in sent} == {("a", False), ("b", False)}
    assert (KEY, "preview") not in states(config)
    assert states(config)[(KEY, "segment")]["members"] == 2
    code, output = invoke(config, "sync")
    assert code == 0 and "preview" not in output, output
    assert receiver.state[("a", KEY)] is True  # the other destination is untouched


def test_a_dropped_destination_at_a_listed_one_s_endpoint_warns_about_a_rotated_key(
    harness: Harness, receiver: Receiver
) -> None:
    """A destination replaced by one at the same endpoint with another write key is another
    source or the same one with a rotated key: the warning advised --send-false, which through
    a rotated key's old name sent every member false where the new name had sent true
    (hostile review). The warning now says when not to."""
    harness.destinations["fresh"] = {**harness.destinations["segment"], "write_key": "k2"}
    harness.set_members(["a", "b"])
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.audience["destinations"] = ["fresh"]
    code, output = invoke(harness.write_config(), "sync", "--dry-run")
    assert code == 0, output
    (warning,) = lines_with(output, f'"{KEY}"', '"segment"', "--send-false")
    assert 'endpoint of "fresh"' in warning and "rotated key" in warning, warning
    assert "without --send-false" in warning, warning


def test_retiring_at_a_moved_endpoint_is_refused(harness: Harness, tmp_path: Path) -> None:
    """`false` sent to a destination's new endpoint would leave the old one holding `true`
    with nothing left to say so: both retire paths refuse, naming the destination."""
    old, moved = tmp_path / "old.jsonl", tmp_path / "moved.jsonl"
    harness.destinations["preview"] = {"type": "file", "path": str(old)}
    harness.audience["destinations"] = ["segment", "preview"]
    harness.set_members(["a", "b"])
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.destinations["preview"]["path"] = str(moved)
    harness.audience["destinations"] = ["segment"]
    config = harness.write_config()
    code, output = invoke(config, "retire", KEY, "--destination", "preview", "--send-false")
    assert code == 1
    assert lines_with(output, f'"{KEY}"', '"preview"', "endpoint"), output
    assert not moved.exists() and states(config)[(KEY, "preview")]["members"] == 2
    harness.config_extra = ""
    harness.audience["name"] = "Someone Else"
    harness.audience["query"] = "SELECT user_id FROM members WHERE user_id = 'nobody'"
    config = harness.write_config()  # the audience left the config; "preview" still moved
    code, output = invoke(config, "retire", KEY, "--send-false")
    assert code == 1
    assert lines_with(output, f'"{KEY}"', '"preview"', "endpoint"), output
    assert not moved.exists()


def test_retiring_a_destination_the_audience_still_lists_is_refused(harness: Harness) -> None:
    harness.set_members(["a"])
    harness.sync()
    config = harness.write_config()
    code, output = invoke(config, "retire", KEY, "--destination", "segment", "--send-false")
    assert code == 1
    assert lines_with(output, f'"{KEY}"', '"segment"', "destinations")


# --- endpoint change -------------------------------------------------------------------------


def test_an_endpoint_change_is_refused_until_a_full_sync(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    with Receiver(write_key=WRITE_KEY).running() as moved:
        harness.destinations["segment"]["endpoint"] = moved.url
        config = harness.write_config()
        harness.set_members(["a", "b", "c"])
        for command in (["sync"], ["run", "--once"], ["check"]):
            code, output = invoke(config, *command)
            assert code == 1, (command, output)
            refused = lines_with(output, '"segment"', f"audience-sync sync {KEY} --full")
            assert len(refused) == 1, (command, output)
        assert moved.messages() == []
        code, output = invoke(config, "sync", KEY, "--full")
        assert code == 0, output
        assert {m["userId"] for m in moved.messages()} == {"a", "b", "c"}
        moved.reset()
        code, output = invoke(config, "sync")
        assert code == 0, output
        assert moved.messages() == []
    # The fingerprint is a hash: no URL, no key in the state DB.
    with harness.engine.connect() as connection:
        stored = connection.execute(text("SELECT * FROM destination_endpoints")).all()
    assert len(stored) == 1 and len(stored[0].fingerprint) == 64
    assert "127.0.0.1" not in str(stored) and WRITE_KEY not in str(stored)


def test_a_new_tenant_in_the_endpoints_query_is_a_moved_endpoint(
    harness: Harness, receiver: Receiver
) -> None:
    """A proxy that routes by query parameter (`?tenant=acme`): another tenant is another
    place, refused until a full sync, as a new host is (it got only the later changes)."""
    harness.destinations["segment"]["endpoint"] = f"{receiver.url}/relay/?tenant=acme"
    harness.set_members(["a", "b"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    harness.destinations["segment"]["endpoint"] = f"{receiver.url}/relay/?tenant=globex"
    config = harness.write_config()
    harness.set_members(["a", "b", "c"])
    code, output = invoke(config, "sync")
    assert code == 1 and lines_with(output, '"segment"', f"audience-sync sync {KEY} --full")
    assert invoke(config, "sync", KEY, "--full")[0] == 0
    tenants = [r.path.rpartition("tenant=")[2] for r in receiver.requests]
    assert tenants[0] == "acme" and set(tenants[1:]) == {"globex"}
    assert {m["userId"] for m in receiver.batches()[-1].body["batch"]} == {"a", "b", "c"}


def test_an_endpoint_recorded_before_queries_counted_is_not_moved(
    harness: Harness, receiver: Receiver
) -> None:
    """Fingerprints recorded before the query counted (scheme, host, port and path only)
    still match the same endpoint after an upgrade: no refusal, and the next plan records
    the fingerprint with its query."""
    from sync.run.drift import endpoint_fingerprint

    harness.destinations["segment"]["endpoint"] = f"{receiver.url}/relay/?tenant=acme"
    harness.set_members(["a"])
    config = harness.write_config()
    assert invoke(config, "sync")[0] == 0
    settings = harness.config().destinations["segment"]
    # What the code before recorded: sha256 of "segment http://host:port/relay".
    host_port = receiver.url.removeprefix("http://")
    old_text = f"segment http://{host_port}/relay"
    legacy = hashlib.sha256(old_text.encode()).hexdigest()
    assert legacy == endpoint_fingerprint(settings, legacy=True) != endpoint_fingerprint(settings)
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE destination_endpoints SET fingerprint = :f"), {"f": legacy})
    harness.set_members(["a", "b"])
    code, output = invoke(config, "sync")
    assert code == 0, output
    with harness.engine.connect() as connection:
        stored = connection.execute(text("SELECT fingerprint FROM destination_endpoints")).scalar()
    assert stored == endpoint_fingerprint(settings)
    # Today's fingerprint is never taken for a legacy one: a parameter added to a URL that had
    # none is a move.
    harness.destinations["segment"]["endpoint"] = f"{receiver.url}/plain"
    config = harness.write_config()
    assert invoke(config, "sync", KEY, "--full")[0] == 0
    harness.destinations["segment"]["endpoint"] = f"{receiver.url}/plain?tenant=globex"
    code, output = invoke(harness.write_config(), "sync")
    assert code == 1 and lines_with(output, '"segment"', f"audience-sync sync {KEY} --full")


def test_the_endpoint_fingerprint_ignores_credentials() -> None:
    """Only scheme, host, port and path define an endpoint: a new password or write key is
    the same destination, and no secret ever reaches the fingerprinted text."""
    from sync.run.drift import endpoint_text

    def hook(url: str) -> WebhookSettings:
        return WebhookSettings(type="webhook", url=url, secret="s3cret")

    base = endpoint_text(hook("https://hooks.example.com/in/"))
    assert base == endpoint_text(hook("HTTPS://user:pw@Hooks.Example.com:443/in?token=t0k"))
    # Other query parameters name the place (a tenant, a channel), in any order.
    acme = endpoint_text(hook("https://hooks.example.com/in?tenant=acme&access_token=t0k&b=2"))
    assert acme == endpoint_text(hook("https://hooks.example.com/in?b=2&tenant=acme&sig=x1"))
    assert acme != endpoint_text(hook("https://hooks.example.com/in?tenant=globex&b=2"))
    assert acme != base and "t0k" not in acme
    assert base != endpoint_text(hook("https://hooks.example.com:8443/in"))
    assert base != endpoint_text(hook("https://hooks.example.com/other"))
    leaky = endpoint_text(hook("https://user:p@ss@hooks.example.com/in?token=t0k#frag"))
    assert "p@ss" not in leaky and "t0k" not in leaky and "user" not in leaky
    segment = SegmentSettings(type="segment", write_key="wk_1", endpoint="https://api.x.io")
    rotated = SegmentSettings(type="segment", write_key="wk_2", endpoint="https://api.x.io")
    assert endpoint_text(segment) == endpoint_text(rotated)
    pasted = SegmentSettings(type="segment", write_key="wk_1", endpoint="https://api.x.io/v1/batch")
    assert endpoint_text(segment) == endpoint_text(pasted)  # the URL sent is the same
    assert "wk_" not in endpoint_text(segment)


def test_a_renamed_destination_is_not_sent_false_through_its_old_name(
    harness: Harness, tmp_path: Path
) -> None:
    """A destination renamed in the config (same file, new name): the drift warning used to
    advise `retire --destination OLD --send-false`, which sent `false` to every current member
    through the file the new name still writes (hostile review). Both now say it is the same
    place, and retiring without --send-false forgets the old name's rows. Two Segment
    destinations differing only by write key are two places and are not refused."""
    out = tmp_path / "out.jsonl"
    harness.destinations["old"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["old"]
    harness.set_members(["a", "b"])
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.destinations["new"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["new"]
    config = harness.write_config()
    code, output = invoke(config, "sync")
    assert code == 0, output
    (warning,) = lines_with(output, f'"{KEY}"', '"old"')
    assert 'delivers where "new" does' in warning and "--send-false" not in warning, warning
    before = out.read_text()
    code, output = invoke(config, "retire", KEY, "--destination", "old", "--send-false")
    assert code == 1, output
    assert lines_with(output, '"old"', 'where "new"', "without --send-false"), output
    assert out.read_text() == before  # nothing sent
    code, output = invoke(config, "retire", KEY, "--destination", "old")
    assert code == 0, output
    assert (KEY, "old") not in states(config) and states(config)[(KEY, "new")]["members"] == 2


def _last_values(out: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for line in out.read_text().splitlines():
        message = json.loads(line)
        last[message["userId"]] = message["traits"][KEY]
    return last


@pytest.mark.parametrize("new_name_synced_first", [True, False])
def test_retiring_a_renamed_destination_hands_what_it_delivered_to_the_new_name(
    new_name_synced_first: bool, harness: Harness, tmp_path: Path
) -> None:
    """A member who left while its destination was renamed: the new name never had it, the
    retire the warning advises forgot the old name's `true`, and `--send-false` is refused (it
    would undo the new name's values): the member kept `true` at the destination for good
    (hostile review). Retiring the old name of a renamed destination now hands what it
    delivered to the new name: the leaver gets its `false`, and members the new name had not
    sent anything yet are not sent their `true` again."""
    out = tmp_path / "out.jsonl"
    harness.destinations["old"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["old"]
    harness.set_members(["a", "b", "gone"])
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.set_members(["a", "b"])  # "gone" leaves at the time of the rename
    harness.destinations["new"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["new"]
    config = harness.write_config()
    if new_name_synced_first:
        assert invoke(config, "sync")[0] == 0  # the new name sends a and b their true
    code, output = invoke(config, "retire", KEY, "--destination", "old")
    assert code == 0, output
    handed = 1 if new_name_synced_first else 3
    assert lines_with(output, '"old"', '"new"', f"{handed} member(s)"), output
    before = len(out.read_text().splitlines())
    code, output = invoke(config, "sync")
    assert code == 0, output
    sent = [json.loads(line) for line in out.read_text().splitlines()[before:]]
    assert [(m["userId"], m["traits"][KEY]) for m in sent] == [("gone", False)]
    assert _last_values(out) == {"a": True, "b": True, "gone": False}
    assert (KEY, "old") not in states(config)
    assert states(config)[(KEY, "new")]["pending"] == 0


def test_a_renamed_destination_s_unfinished_delivery_is_handed_over_in_doubt(
    harness: Harness, tmp_path: Path
) -> None:
    """A delivery to the old name crashed after the destination took the batch (its progress
    row says rows may be there); the destination was renamed and a member left: the retire
    handed the rows over as settled and deleted the progress row, so the leaver never got its
    `false` (second hostile review)."""
    from sync.delivery.sending import DeliveryHooks
    from sync.run.context import RunHooks

    out = tmp_path / "out.jsonl"
    harness.destinations["old"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["old"]
    harness.set_members(["a", "gone"])

    def crash() -> None:
        raise RuntimeError("killed after the destination took the batch")

    harness.hooks = RunHooks(delivery=DeliveryHooks(after_send=crash))
    harness.sync()
    harness.hooks = RunHooks()
    assert _last_values(out) == {"a": True, "gone": True}
    assert not any(row.synced_value for row in harness.memberships("old").values())
    harness.set_members(["a"])
    harness.destinations["new"] = {"type": "file", "path": str(out)}
    harness.audience["destinations"] = ["new"]
    config = harness.write_config()
    code, output = invoke(config, "retire", KEY, "--destination", "old")
    assert code == 0, output
    code, output = invoke(config, "sync")
    assert code == 0, output
    assert _last_values(out) == {"a": True, "gone": False}


def test_segment_destinations_with_different_write_keys_are_two_places() -> None:
    from sync.config import parse_config
    from sync.run.drift import same_place

    base = '[destinations.{name}]\ntype = "segment"\nwrite_key = "{key}"\n'
    text = "".join(
        base.format(name=n, key=k) for n, k in (("a", "k1"), ("b", "k2"), ("c", "k1"))
    )
    destinations = parse_config(text, "x.toml", Path("."), {}).destinations
    assert not same_place(destinations["a"], destinations["b"])
    assert same_place(destinations["a"], destinations["c"])


def test_destinations_differing_by_a_credential_in_the_url_or_by_mode_are_two_places() -> None:
    """`?access_token=A` and `?access_token=B` at one URL are two tenants, as are two user
    names in a URL, and a track-only destination holds nothing an identify would undo
    (second review: retiring the old one with --send-false was refused as a rename)."""
    from sync.config import parse_config
    from sync.run.drift import same_place

    hook = '[destinations.{name}]\ntype = "webhook"\nurl = "{url}"\n'
    urls = {
        "a": "http://127.0.0.1:19210/ingest?access_token=tenantAAAAAAAA",
        "b": "http://127.0.0.1:19210/ingest?access_token=tenantBBBBBBBB",
        "c": "http://127.0.0.1:19210/ingest?access_token=tenantAAAAAAAA",
        "d": "https://alice:pw1@h.example/x",
        "e": "https://bob:pw2@h.example/x",
    }
    text = "".join(hook.format(name=n, url=u) for n, u in urls.items())
    text += '[destinations.s1]\ntype = "segment"\nwrite_key = "k1"\n'
    text += '[destinations.s2]\ntype = "segment"\nwrite_key = "k1"\nmode = "track"\n'
    destinations = parse_config(text, "x.toml", Path("."), {}).destinations
    assert not same_place(destinations["a"], destinations["b"])
    assert same_place(destinations["a"], destinations["c"])
    assert not same_place(destinations["d"], destinations["e"])
    assert not same_place(destinations["s1"], destinations["s2"])


def test_a_rename_is_seen_through_a_trailing_slash_or_the_batch_path() -> None:
    """The URL as written differed by a trailing slash or Segment's `/v1/batch`, which name
    the same place, so retiring the old name with --send-false sent false through the new
    one's endpoint (third review)."""
    from sync.config import parse_config
    from sync.run.drift import same_place

    text = (
        '[destinations.a]\ntype = "webhook"\nurl = "http://127.0.0.1:19301/hook"\n'
        '[destinations.b]\ntype = "webhook"\nurl = "http://127.0.0.1:19301/hook/"\n'
        '[destinations.c]\ntype = "webhook"\nurl = "HTTP://127.0.0.1:19301/hook?access_token=x1234567"\n'
        '[destinations.d]\ntype = "webhook"\nurl = "http://127.0.0.1:19301/hook/?access_token=x1234567"\n'
        '[destinations.s1]\ntype = "segment"\nwrite_key = "k1"\n'
        '[destinations.s2]\ntype = "segment"\nwrite_key = "k1"\n'
        'endpoint = "https://api.segment.io/v1/batch"\n'
    )
    destinations = parse_config(text, "x.toml", Path("."), {}).destinations
    assert same_place(destinations["a"], destinations["b"])
    assert same_place(destinations["c"], destinations["d"])
    assert not same_place(destinations["a"], destinations["c"])
    assert same_place(destinations["s1"], destinations["s2"])


def test_a_rename_is_seen_through_header_case_and_spaces() -> None:
    """Header names are case-insensitive and a write key's surrounding spaces are not part of
    it (fourth review)."""
    from sync.config import parse_config
    from sync.run.drift import same_place

    text = (
        '[destinations.a]\ntype = "webhook"\nurl = "http://h.example/x"\n'
        '[destinations.a.headers]\nAuthorization = "Bearer abcdefgh"\n'
        '[destinations.b]\ntype = "webhook"\nurl = "http://h.example/x"\n'
        '[destinations.b.headers]\nauthorization = "Bearer abcdefgh"\n'
        '[destinations.s1]\ntype = "segment"\nwrite_key = "k1"\n'
        '[destinations.s2]\ntype = "segment"\nwrite_key = " k1 "\n'
    )
    destinations = parse_config(text, "x.toml", Path("."), {}).destinations
    assert same_place(destinations["a"], destinations["b"])
    assert same_place(destinations["s1"], destinations["s2"])


def test_a_destination_down_at_daemon_start_does_not_hold_its_runs_back(
    harness: Harness, receiver: Receiver
) -> None:
    """The daemon retires removed computations before its first runs; with the orphan's
    destination down that took the whole delivery budget (10 minutes by default) with no
    run started and no /healthz (third hostile review). Each now gets a short budget at
    start (the sweeps go on), and the health endpoint answers meanwhile."""
    import threading

    import httpx

    from sync.scheduler import Daemon
    from tests.processes import wait_for
    from tests.receiver import Scripted

    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.defaults.update(on_removed="retire", schedule="1h", guard_min_members=10)
    harness.config_extra = '[daemon]\nhttp = "127.0.0.1:0"\n'
    harness.set_members(["a", "c1", "new"])

    def churned_down(request: Any) -> Scripted | None:
        if any(OTHER in m.get("traits", {}) for m in request.body["batch"]):
            return Scripted(503, body='{"error": "down"}')
        return None

    receiver.on_request = churned_down
    daemon = Daemon(harness.config(), harness.engine)
    daemon.startup_retire_seconds = 1.0
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        wait_for(lambda: daemon.monitor is not None, 20, "the monitor")
        assert daemon.monitor is not None
        assert httpx.get(f"{daemon.monitor.url}healthz", timeout=5).status_code == 200
        wait_for(lambda: receiver.state.get(("new", KEY)) is True, 30, "the first run")
    finally:
        daemon.stop.set()
        thread.join(60)
    assert states(harness.write_config())[(OTHER, "segment")]["state"] == "orphaned"


def test_a_stopped_or_timed_out_start_up_retire_starts_no_more_orphans(
    harness: Harness, receiver: Receiver
) -> None:
    """With several orphans, the start-up retire took 30 s each, and a SIGTERM meanwhile went
    on to log every remaining orphan as not retired (fourth hostile review)."""
    from sync.engine import Syncer

    harness.set_members(["a", "c1"])
    harness.config_extra = CHURNED
    assert invoke(harness.write_config(), "sync")[0] == 0
    harness.defaults.update(on_removed="retire")
    harness.config_extra = ""
    receiver.reset()
    syncer = Syncer(harness.config(), harness.engine)
    assert syncer.retire_orphans(force=False, time_budget=-1.0) == []
    syncer.stop.set()
    assert syncer.retire_orphans(force=False) == []
    assert receiver.messages() == []
    assert states(harness.write_config())[(OTHER, "segment")]["state"] == "orphaned"
