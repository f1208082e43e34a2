"""The sync engine end to end: real state DBs (SQLite, PostgreSQL), a real HTTP receiver."""

from __future__ import annotations

import base64
import re
import shlex
from datetime import datetime

from tests.harness import WRITE_KEY, Harness
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def values(messages: list[dict]) -> dict[str, bool]:
    return {m["userId"]: m["traits"][KEY] for m in messages}


def test_first_sync_sends_every_member_then_only_changes(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members([f"u{i:03d}" for i in range(250)])
    report = harness.sync()
    assert report.status == "succeeded", report.error
    sent = receiver.messages()
    assert len(sent) == 250
    assert values(sent) == {f"u{i:03d}": True for i in range(250)}
    assert all(
        m["type"] == "identify" and m["traits"]["email"].endswith("@example.com") for m in sent
    )
    assert report.destinations[0].sent == 250 and report.destinations[0].added == 250

    receiver.reset()
    report = harness.sync()
    assert report.status == "succeeded" and receiver.messages() == []

    harness.set_members([f"u{i:03d}" for i in range(10, 260)])  # 10 leave, 10 enter
    report = harness.sync()
    changes = values(receiver.messages())
    assert changes == {
        **{f"u{i:03d}": False for i in range(10)},
        **{f"u{i:03d}": True for i in range(250, 260)},
    }
    entry = report.destinations[0]
    assert (entry.added, entry.removed, entry.sent) == (10, 10, 20)
    # A leaver's false still carries the traits it had.
    leaver = next(m for m in receiver.messages() if m["userId"] == "u000")
    assert leaver["traits"]["email"] == "u000@example.com"


def test_requests_follow_the_segment_spec(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["batch_size"] = 40
    harness.set_members([f"u{i:04d}" for i in range(130)])
    harness.sync()
    expected_auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    batches = receiver.batches()
    assert sorted(len(b.body["batch"]) for b in batches) == [10, 40, 40, 40]
    for request in batches:
        assert request.path == "/v1/batch"
        assert request.headers["authorization"] == expected_auth
        assert len(request.raw) <= 500 * 1024
        assert ISO.match(request.body["sentAt"])
        for message in request.body["batch"]:
            assert len(message["messageId"]) < 100
            assert ISO.match(message["timestamp"])
            personas = message["context"]["personas"]
            assert (
                personas["computation_class"] == "audience" and personas["computation_key"] == KEY
            )
            assert message["context"]["library"]["name"] == "audience-sync"
    # Batches are cut in member order (they may complete in any order: 4 are in flight).
    in_batches = sorted([m["userId"] for m in b.body["batch"]] for b in batches)
    flat = [user for batch in in_batches for user in batch]
    assert flat == sorted(flat) == [f"u{i:04d}" for i in range(130)]


def test_batches_respect_the_byte_limit(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"].update(batch_size=2500, max_batch_bytes=20_000)
    harness.set_members([(f"u{i}", "x" * 900 + "@example.com") for i in range(100)])
    harness.sync()
    batches = receiver.batches()
    assert len(batches) > 4
    assert all(len(b.raw) <= 20_000 for b in batches)
    assert len(receiver.messages()) == 100


def test_oversized_message_is_sent_without_its_traits(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["small", ("huge", "y" * 40_000)])
    report = harness.sync()
    sent = {m["userId"]: m["traits"] for m in receiver.messages()}
    assert sent == {
        "huge": {"high_value_users": True},
        "small": {"email": "small@example.com", "high_value_users": True},
    }
    assert report.status == "succeeded" and report.destinations[0].trimmed == 1
    assert harness.memberships()["huge"].status == "in_sync"


def test_resends_reuse_the_message_id(harness: Harness, receiver: Receiver) -> None:
    # Long enough for a first attempt on a loaded machine (300 ms expired before one, once).
    harness.defaults["delivery_time_budget"] = "2s"
    harness.set_members(["a", "b", "c"])
    receiver.script = [Scripted(503)] * 100
    report = harness.sync()
    assert report.status == "partial"
    failed_ids = {m["messageId"] for r in receiver.requests for m in r.body["batch"]}
    receiver.script = []
    rows = harness.memberships()
    assert all(
        r.synced_value is None and r.status == "pending" and "503" in r.last_error
        for r in rows.values()
    )
    with harness.engine.begin() as connection:  # make the backoff expire now
        from sync.state.tables import MEMBERSHIPS

        connection.execute(MEMBERSHIPS.update().values(next_attempt_at=None))
    report = harness.sync()
    assert report.status == "succeeded"
    assert {m["messageId"] for m in receiver.messages()} == failed_ids


def test_transient_errors_are_retried(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b"])
    receiver.script = [Scripted(500), Scripted(500)]
    report = harness.sync()
    assert report.status == "succeeded"
    assert [r.status for r in receiver.requests] == [500, 500, 200]
    assert values(receiver.messages()) == {"a": True, "b": True}
    assert all(
        r.synced_value == "true" and r.status == "in_sync" for r in harness.memberships().values()
    )


def test_retry_after_is_honoured(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a"])
    receiver.script = [Scripted(429, headers={"Retry-After": "2"})]
    harness.sync()
    first, second = receiver.requests
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 2.0


def test_poisoned_message_is_isolated(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["batch_size"] = 500
    members = [f"u{i:03d}" for i in range(500)]
    harness.set_members(members)
    receiver.poison = {"u123"}
    report = harness.sync()
    assert report.status == "partial"
    delivered = values(receiver.messages())
    assert len(delivered) == 499 and "u123" not in delivered
    entry = report.destinations[0]
    assert (entry.sent, entry.rejected) == (499, 1)
    bad = harness.memberships()["u123"]
    assert bad.status == "rejected" and bad.attempts == 1
    assert "HTTP 400" in bad.last_error and "invalid message u123" in bad.last_error


def test_rejected_rows_retry_on_later_runs_then_fail(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["max_attempts"] = 2
    harness.set_members(["good", "bad"])
    receiver.poison = {"bad"}
    harness.sync()
    assert harness.memberships()["bad"].status == "rejected"
    harness.sync()
    bad = harness.memberships()["bad"]
    assert bad.status == "failed" and bad.attempts == 2
    receiver.reset()
    report = harness.sync()
    assert receiver.requests == []  # failed rows wait for a person
    assert report.destinations[0].failed == 1


def test_bad_credentials_fail_the_run(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["write_key"] = "wrong-key"
    harness.set_members(["a", "b"])
    report = harness.sync()
    assert report.status == "failed"
    assert "rejected the credentials" in report.error and "HTTP 401" in report.error
    assert "wrong-key" not in report.error
    assert all(r.synced_value is None for r in harness.memberships().values())
    assert harness.runs()[-1].status == "failed"


def test_timeouts_leave_rows_pending_and_the_run_partial(
    harness: Harness, receiver: Receiver
) -> None:
    harness.destinations["segment"]["timeout"] = 0.2
    harness.defaults["delivery_time_budget"] = "1s"
    receiver.delay = 0.6
    harness.set_members(["a", "b"])
    report = harness.sync()
    assert report.status == "partial"
    assert len(receiver.requests) >= 2  # retried
    rows = harness.memberships()
    assert all(r.status == "pending" and r.synced_value is None for r in rows.values())
    assert "Timeout" in rows["a"].last_error


def test_changes_coalesce_before_delivery(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["delivery_time_budget"] = "100ms"
    harness.set_members(["stays", "flaky"])
    receiver.script = [Scripted(429)] * 50  # refused: nothing about "flaky" was applied
    harness.sync()
    receiver.script = []
    receiver.reset()
    receiver.seen_ids.clear()
    receiver.state.clear()
    harness.set_members(["stays"])
    with harness.engine.begin() as connection:
        from sync.state.tables import MEMBERSHIPS

        connection.execute(MEMBERSHIPS.update().values(next_attempt_at=None))
    harness.defaults["delivery_time_budget"] = "30s"  # 100 ms expired before a send, once
    harness.sync()
    assert [m["userId"] for m in receiver.messages()] == ["stays"]
    flaky = harness.memberships()["flaky"]
    assert flaky.desired is False and flaky.synced_value is None and flaky.status == "in_sync"


def test_guard_stops_an_emptied_audience(harness: Harness, receiver: Receiver) -> None:
    harness.defaults["guard_min_members"] = 100
    harness.set_members([f"u{i:03d}" for i in range(150)])
    harness.sync()
    before = harness.memberships()
    receiver.reset()
    harness.set_members([])
    report = harness.sync()
    assert report.status == "guarded" and "remove all 150 members" in report.error
    assert "--force" in report.error
    assert receiver.requests == []
    assert harness.memberships() == before
    assert harness.runs()[-1].status == "guarded"
    report = harness.sync(force=True)
    assert report.status == "succeeded"
    assert values(receiver.messages()) == {f"u{i:03d}": False for i in range(150)}


def test_the_guard_hint_quotes_the_name_for_the_shell(harness: Harness, receiver: Receiver) -> None:
    harness.audience["name"] = """Bob's "VIP" $list"""
    harness.defaults["guard_min_members"] = 2
    harness.set_members(["a", "b", "c"])
    harness.sync()
    harness.set_members([])
    report = harness.sync()
    assert report.status == "guarded" and report.error is not None
    command = report.error.split("`")[1]
    assert shlex.split(command) == ["audience-sync", "sync", "--force", harness.audience["name"]]


def test_guard_ratio_and_small_audiences(harness: Harness, receiver: Receiver) -> None:
    harness.defaults.update(guard_min_members=100, max_removal_ratio=0.5)
    harness.set_members([f"u{i:03d}" for i in range(200)])
    harness.sync()
    harness.set_members([f"u{i:03d}" for i in range(90)])  # removes 55%
    report = harness.sync()
    assert report.status == "guarded" and "110 of 200" in report.error
    harness.set_members([f"u{i:03d}" for i in range(110)])  # removes 45%
    assert harness.sync().status == "succeeded"
    # Under guard_min_members the audience churns freely.
    harness.defaults["guard_min_members"] = 1000
    harness.set_members([])
    assert harness.sync().status == "succeeded"


def test_full_resync_and_include_exited(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b", "c"])
    harness.sync()
    first_ids = {m["messageId"] for m in receiver.messages()}
    harness.set_members(["a", "b"])
    harness.sync()
    receiver.reset()
    report = harness.sync(full=True)
    assert report.status == "succeeded"
    assert values(receiver.messages()) == {"a": True, "b": True}
    # A deliberate resend carries new messageIds, so de-duplicating destinations keep it.
    assert not first_ids & {m["messageId"] for m in receiver.messages()}
    receiver.reset()
    harness.sync(full=True, include_exited=True)
    assert values(receiver.messages()) == {"a": True, "b": True, "c": False}
    assert harness.runs()[-1].trigger == "full"


def test_dry_run_writes_nothing_and_sends_nothing(harness: Harness, receiver: Receiver) -> None:
    harness.set_members(["a", "b"])
    harness.sync()
    harness.set_members(["b", "c", "d"])
    snapshot = (harness.memberships(), harness.runs())
    receiver.reset()
    report = harness.sync(dry_run=True)
    assert report.status == "planned"
    entry = report.destinations[0]
    assert (entry.added, entry.removed, entry.pending) == (2, 1, 3)
    assert receiver.requests == []
    assert (harness.memberships(), harness.runs()) == snapshot


def test_new_destination_gets_a_full_send_of_its_own(
    harness: Harness, receiver: Receiver, tmp_path
) -> None:
    harness.set_members(["a", "b"])
    harness.sync()
    harness.destinations["preview"] = {"type": "file", "path": "out.jsonl"}
    harness.audience["destinations"] = ["segment", "preview"]
    receiver.reset()
    report = harness.sync()
    assert receiver.messages() == []
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [d.sent for d in report.destinations] == [0, 2]


def test_memberships_record_versions_and_timestamps(harness: Harness) -> None:
    harness.set_members(["a"])
    harness.sync()
    first = harness.memberships()["a"]
    assert (first.desired, first.synced_value, first.version, first.status) == (
        True,
        "true",
        1,
        "in_sync",
    )
    assert isinstance(first.changed_at, datetime) and first.changed_at.tzinfo is not None
    harness.set_members([])
    harness.sync()
    harness.set_members(["a"])
    harness.sync()
    again = harness.memberships()["a"]
    assert (again.desired, again.synced_value, again.version) == (True, "true", 3)


def test_acknowledgement_is_compare_and_set(harness: Harness, receiver: Receiver) -> None:
    """A change planned while its batch is in flight stays pending after the ack."""
    from sqlalchemy import update

    from sync.state.tables import MEMBERSHIPS

    harness.set_members(["a", "b"])

    def replan(request):
        # What a concurrent plan would do: a's membership changes while the batch is out.
        with harness.engine.begin() as connection:
            connection.execute(
                update(MEMBERSHIPS)
                .where(MEMBERSHIPS.c.member_id == "a")
                .values(desired=False, value="false", version=MEMBERSHIPS.c.version + 1)
            )
        receiver.on_request = None

    receiver.on_request = replan
    harness.sync()
    rows = harness.memberships()
    assert rows["b"].synced_value == "true" and rows["b"].status == "in_sync"
    assert rows["a"].synced_value is None and rows["a"].version == 2
    assert rows["a"].status == "pending" and rows["a"].in_doubt  # its `false` is still to be sent


def test_emptying_the_staging_table_spares_other_runs(harness: Harness, receiver: Receiver) -> None:
    """After a plan only this run's staged rows go; another run's (another audience staging
    at the same time) stay, and with none the table ends empty."""
    from sqlalchemy import func, insert, select

    from sync.state.tables import STAGED

    harness.set_members(["a", "b"])
    harness.sync()
    with harness.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(STAGED)).scalar() == 0
    other = {"run_id": 999_999, "id_kind": "user", "member_id": "elsewhere", "traits": None}
    with harness.engine.begin() as connection:
        connection.execute(insert(STAGED).values(**other))
    harness.set_members(["a", "c"])
    assert harness.sync().status == "succeeded"
    with harness.engine.connect() as connection:
        left = connection.execute(select(STAGED.c.run_id, STAGED.c.member_id)).all()
    assert left == [(999_999, "elsewhere")]
