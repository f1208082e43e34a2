"""Delivery under faults a destination causes: a 5xx after applying a batch, a redirect, a
message over the size limit, a file write cut short."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from sync.cli import cli
from sync.destinations.http import classify_response
from sync.messages import AudienceContext, MessageEncoder
from sync.state.tables import MEMBERSHIPS
from tests.harness import WRITE_KEY, Harness
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"


def _retry_now(harness: Harness) -> None:
    """Let rows left with a backoff be sent by the next run."""
    with harness.engine.begin() as connection:
        connection.execute(MEMBERSHIPS.update().values(next_attempt_at=None))


# --- finding 5: a 5xx says nothing about whether the batch was applied ---------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_after_the_batch_was_applied_leaves_it_in_doubt(
    status: int, state_engine: Engine, tmp_path: Path
) -> None:
    chaos = Receiver(WRITE_KEY, order="timestamp", strict=True)
    chaos.forced = f"applied-{status}"
    with chaos.running():
        harness = Harness(tmp_path, state_engine, chaos.url)
        harness.defaults["delivery_time_budget"] = "2s"  # a first attempt even under load
        harness.set_members(["leaver", "stays"])
        assert harness.sync().status == "partial"
        # The gateway answered 5xx every time, but the backend applied the batch.
        assert chaos.values(KEY) == {"leaver": True, "stays": True}
        rows = harness.memberships()
        assert all(r.in_doubt and r.synced_value is None for r in rows.values())
        assert all(str(status) in r.last_error for r in rows.values())
        chaos.forced = None
        harness.set_members(["stays"])  # it leaves before the next run
        _retry_now(harness)
        assert harness.sync().status == "succeeded"
    assert chaos.values(KEY) == {"leaver": False, "stays": True}
    assert not chaos.violations
    assert not any(r.in_doubt for r in harness.memberships().values())


@pytest.mark.parametrize("then", [401, 404])
def test_a_batch_that_may_have_been_applied_stays_in_doubt_when_its_retry_is_refused(
    then: int, harness: Harness, receiver: Receiver
) -> None:
    """The gateway applied the batch and answered 502; the retry was refused for good (401,
    404). The rows were left pending but no longer in doubt, logged `refused`: a member who
    then left was sent nothing and kept `true` (hostile review)."""
    members = [f"u{i}" for i in range(6)]
    harness.set_members(members)
    answered: list[int] = []

    def gateway(request: Any) -> Scripted:
        answered.append(1)
        if len(answered) == 1:
            receiver._apply(request.body["batch"])
            return Scripted(502, body="bad gateway")
        return Scripted(then, body='{"error": "no"}')

    harness.defaults["retry_initial_delay"] = "0.01s"
    receiver.on_request = gateway
    assert harness.sync().status == "failed"
    rows = harness.memberships()
    assert {row.in_doubt for row in rows.values()} == {True}
    with harness.engine.connect() as connection:
        outcomes = connection.exec_driver_sql("SELECT DISTINCT outcome FROM deliveries").all()
    assert [o for (o,) in outcomes] == ["unknown"]
    receiver.on_request = None
    harness.set_members(members[3:])
    _retry_now(harness)
    assert harness.sync().status == "succeeded"
    assert receiver.values(KEY) == {m: m in members[3:] for m in members}


def test_a_split_half_applied_before_the_other_is_refused_for_good_is_acknowledged(
    harness: Harness, receiver: Receiver
) -> None:
    """A rejected batch is split; its first half is applied (200), the second refused for good
    (401). The whole batch was left as not sent and not in doubt, logged `refused`: a member of
    the applied half who then left was sent nothing and kept `true` (second hostile review)."""
    members = ["u0", "u1", "u2", "u3"]
    harness.set_members(members)
    answered: list[int] = []

    def script(request: Any) -> Scripted | None:
        answered.append(1)
        if len(answered) == 1:
            return Scripted(400, body='{"error": "bad batch"}')
        if [m["userId"] for m in request.body["batch"]] == ["u0", "u1"]:
            return None  # applied, 200
        return Scripted(401, body='{"error": "revoked"}')

    receiver.on_request = script
    assert harness.sync().status == "failed"
    assert receiver.values(KEY) == {"u0": True, "u1": True}
    rows = harness.memberships()
    assert {m: rows[m].synced_value for m in members} == {
        "u0": "true", "u1": "true", "u2": None, "u3": None
    }
    with harness.engine.connect() as connection:
        outcomes = dict(
            connection.exec_driver_sql("SELECT member_id, outcome FROM deliveries").all()
        )
    assert outcomes == {
        "u0": "acknowledged", "u1": "acknowledged", "u2": "refused", "u3": "refused"
    }
    receiver.on_request = None
    harness.set_members(["u1", "u2", "u3"])
    _retry_now(harness)
    assert harness.sync().status == "succeeded"
    assert receiver.values(KEY) == {"u0": False, "u1": True, "u2": True, "u3": True}


def test_each_half_of_a_split_batch_keeps_its_own_doubt(
    harness: Harness, receiver: Receiver
) -> None:
    """A rejected batch is split: one half is refused (429, not applied), one member of the
    other half may have been applied (502), one was rejected alone (400). The split batch's
    outcome carried one "maybe applied" flag, so the refused and the rejected rows were
    recorded in doubt and `unknown` too: an unneeded `false` to a member who then left and was
    never sent anything (hostile review)."""
    members = ["u0", "u1", "u2", "u3"]
    harness.set_members(members)
    receiver.poison = {"u3"}
    harness.defaults["retry_initial_delay"] = "0.01s"
    harness.defaults["delivery_time_budget"] = "1s"

    def script(request: Any) -> Scripted | None:
        batch = [m["userId"] for m in request.body["batch"]]
        if batch == ["u0", "u1"]:
            return Scripted(429, body='{"error": "slow down"}')
        if batch == ["u2"]:
            return Scripted(502, body="bad gateway")
        return None  # the receiver's own answer: 400 for a batch holding u3

    receiver.on_request = script
    assert harness.sync().status == "partial"
    rows = harness.memberships()
    assert {m: rows[m].in_doubt for m in members} == {
        "u0": False, "u1": False, "u2": True, "u3": False
    }
    with harness.engine.connect() as connection:
        outcomes = set(
            connection.exec_driver_sql("SELECT member_id, outcome FROM deliveries").all()
        )
    assert {(m, o) for m, o in outcomes if m != "u2"} == {
        ("u0", "refused"), ("u1", "refused"), ("u3", "rejected")
    }
    assert {o for m, o in outcomes if m == "u2"} == {"unknown"}
    receiver.on_request = None
    receiver.poison = set()
    harness.set_members(["u2"])  # u0, u1, u3 leave: none of them was ever applied
    _retry_now(harness)
    receiver.reset()
    assert harness.sync().status == "succeeded"
    assert sorted(m["userId"] for m in receiver.messages()) == ["u2"]


def test_a_rejected_message_an_earlier_attempt_may_have_applied_says_so(
    harness: Harness, receiver: Receiver
) -> None:
    """The gateway applied a batch and answered 502; the retry was rejected (400) and split
    until u1 was alone. u1's only ledger row read `rejected`, while the destination holds its
    messageId (hostile review): the row stays `rejected` (its last answer) and says so."""
    harness.set_members(["u0", "u1"])
    harness.defaults["retry_initial_delay"] = "0.01s"
    answered: list[int] = []

    def gateway(request: Any) -> Scripted | None:
        answered.append(1)
        if len(answered) == 1:
            receiver._apply(request.body["batch"])
            return Scripted(502, body="bad gateway")
        return None  # the receiver's own answer: 400 for a batch holding u1

    receiver.poison = {"u1"}
    receiver.on_request = gateway
    harness.sync()
    rows = harness.memberships()
    assert rows["u1"].in_doubt and not rows["u0"].in_doubt
    with harness.engine.connect() as connection:
        logged = connection.exec_driver_sql(
            "SELECT outcome, reason FROM deliveries WHERE member_id = 'u1'"
        ).all()
    assert [outcome for outcome, _ in logged] == ["rejected"]
    assert "an earlier attempt may have applied it" in logged[0][1]


def test_each_half_of_a_split_batch_keeps_its_own_reason_and_retry_time(
    harness: Harness, receiver: Receiver
) -> None:
    """A rejected batch is split: one half is throttled (429, Retry-After 30), the other
    applied and answered 502, then refused (401). The second half's rows were recorded with
    the first half's 429 and its 30 s retry time, their ledger rows `unknown` with HTTP 429
    (hostile review): each half keeps its own."""
    members = [f"u{i}" for i in range(8)]
    harness.set_members(members)
    harness.defaults["retry_initial_delay"] = "0.01s"
    seen: list[list[str]] = []

    def script(request: Any) -> Scripted | None:
        batch = [m["userId"] for m in request.body["batch"]]
        seen.append(batch)
        if len(seen) == 1:
            return Scripted(400, body='{"error": "bad batch"}')
        if batch == members[:4]:
            return Scripted(429, body='{"error": "slow down"}', headers={"Retry-After": "30"})
        if seen.count(members[4:]) == 1:
            receiver._apply(request.body["batch"])
            return Scripted(502, body="bad gateway")
        return Scripted(401, body='{"error": "revoked"}')

    receiver.on_request = script
    harness.sync()
    rows = harness.memberships()
    with harness.engine.connect() as connection:
        logged = {
            member: (outcome, status)
            for member, outcome, status in connection.exec_driver_sql(
                "SELECT member_id, outcome, http_status FROM deliveries"
            ).all()
        }
    for member in members[:4]:
        assert not rows[member].in_doubt and "429" in rows[member].last_error
        assert logged[member] == ("refused", 429)
    for member in members[4:]:
        assert rows[member].in_doubt and "401" in rows[member].last_error, rows[member]
        assert logged[member] == ("unknown", 401)
    later = {m: rows[m].next_attempt_at for m in members}
    assert later["u0"] is not None and later["u4"] is not None
    assert later["u0"] - later["u4"] > timedelta(seconds=20), later


@pytest.mark.parametrize(
    ("status", "unknown"),
    [
        *[(status, True) for status in (500, 502, 503, 504, 520, 599)],
        *[(status, False) for status in (408, 425, 429)],
    ],
)
def test_the_classifier_says_whether_a_failed_batch_may_have_been_applied(
    status: int, unknown: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text="upstream timed out")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        response = client.post("http://collector.test/v1/batch")
    outcome = classify_response(response.status_code, response.headers, response.text)
    assert outcome.verdict == "transient"
    assert outcome.outcome_unknown is unknown
    refused = classify_response(400, httpx.Headers(), "bad")
    assert refused.verdict == "rejected" and refused.outcome_unknown is False


# --- finding 15: a redirect is a configuration error that says where it points -------------------


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_reports_its_location(status: int, harness: Harness, receiver: Receiver) -> None:
    target = "https://robot:hunter2@collector.example.com/v2/batch"
    receiver.script = [Scripted(status, "", {"Location": target})]
    harness.set_members(["a"])
    report = harness.sync()
    assert report.status == "failed"
    assert report.error is not None and "\n" not in report.error
    assert f"HTTP {status}" in report.error
    assert "redirect to https://***@collector.example.com/v2/batch" in report.error
    assert "hunter2" not in report.error and "robot" not in report.error
    row = harness.memberships()["a"]
    assert row.status == "pending" and row.synced_value is None and not row.in_doubt
    assert len(receiver.requests) == 1  # not followed, not retried


def test_the_classifier_redacts_and_flattens_a_location() -> None:
    outcome = classify_response(
        302, httpx.Headers({"Location": "http://u:p@x.test/a b"}), "<html>moved</html>"
    )
    assert outcome.verdict == "permanent"
    assert "redirect to http://***@x.test/a b" in outcome.reason and "u:p" not in outcome.reason
    bare = classify_response(301, httpx.Headers(), "")
    assert bare.verdict == "permanent" and "without a Location" in bare.reason


# --- finding 6: a value change is never blocked by its traits ------------------------------------

BIG = "y" * 40_000  # over Segment's 32 KB per message


def _two_traits(harness: Harness) -> None:
    """Traits `email` and `note` (the warehouse's third column)."""
    harness.audience["query"] = "SELECT user_id, email, anonymous_id AS note FROM members"
    harness.audience["traits"] = ["email", "note"]


def test_a_leaver_whose_trait_grew_past_the_limit_still_gets_false(
    harness: Harness, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    _two_traits(harness)
    harness.set_members([("a", "a@x", "short"), ("b", "b@x", "short")])
    assert harness.sync().status == "succeeded"
    harness.set_members([("a", "a@x", BIG), ("b", "b@x", "short")])
    harness.sync()  # a continuing member: its traits follow the source, nothing is sent
    harness.set_members([("b", "b@x", "short")])
    with caplog.at_level(logging.WARNING, logger="sync"):
        report = harness.sync()
    assert report.status == "succeeded"
    assert report.destinations[0].trimmed == 1
    assert receiver.state[("a", KEY)] is False
    last = receiver.messages()[-1]
    assert last["userId"] == "a" and last["traits"] == {"email": "a@x", KEY: False}
    assert len(json.dumps(last, separators=(",", ":"))) < 32 * 1024
    row = harness.memberships()["a"]
    assert row.status == "in_sync" and row.synced_value == "false"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("member a" in w and "note" in w for w in warnings), warnings


@pytest.mark.parametrize("mode", ["identify", "track", "both"])
def test_a_new_member_with_a_huge_trait_is_sent_without_it(
    mode: str, harness: Harness, receiver: Receiver
) -> None:
    _two_traits(harness)
    harness.destinations["segment"]["mode"] = mode
    harness.set_members([("small", "s@x", "short"), ("huge", "h@x", BIG)])
    report = harness.sync()
    assert report.status == "succeeded" and report.destinations[0].trimmed == 1
    sent = {(m["userId"], m["type"]): m for m in receiver.messages()}
    for (who, kind), message in sent.items():
        assert len(json.dumps(message, separators=(",", ":"))) < 32 * 1024
        traits = message["traits"] if kind == "identify" else message["context"].get("traits")
        expected_note = None if who == "huge" else "short"
        assert (traits or {}).get("note") == expected_note
        assert (traits or {}).get("email") == f"{who[0]}@x"
    if mode != "track":  # the test receiver keeps identify traits only
        assert receiver.state[("huge", KEY)] is True
    assert harness.memberships()["huge"].status == "in_sync"
    # The trimmed message keeps its messageId: the same change sent again is de-duplicated.
    ids = {m["messageId"] for m in receiver.messages() if m["userId"] == "huge"}
    assert all(i.startswith("as-") and i.endswith("-v1") for i in ids)


def test_the_encoder_drops_the_largest_traits_first_and_keeps_the_message_id() -> None:
    ctx = AudienceContext("inst", 1, KEY, "segment")
    encoder = MessageEncoder(ctx)
    traits = json.dumps({"email": "a@x", "bio": "b" * 500, "note": "n" * 900, "age": 7})
    row = ("user", "a", None, "false", 3, "2024-05-01 10:00:00", traits)
    full = encoder.messages(*row)

    def under(limit: int) -> Callable[[list[str]], bool]:
        return lambda messages: all(len(m.encode()) <= limit for m in messages)

    messages, dropped = encoder.fitting(*row, under(len(full[0]) - 600))
    assert dropped == ["note"]
    assert json.loads(messages[0])["traits"] == {
        "email": "a@x",
        "bio": "b" * 500,
        "age": 7,
        KEY: False,
    }
    assert json.loads(messages[0])["messageId"] == json.loads(full[0])["messageId"]
    messages, dropped = encoder.fitting(*row, under(len(full[0]) - 1200))
    assert dropped == ["note", "bio"]
    # Nothing fits: every trait is dropped and the caller sees the bare message is still too big.
    messages, dropped = encoder.fitting(*row, under(10))
    assert dropped == ["note", "bio", "email", "age"]
    assert json.loads(messages[0])["traits"] == {KEY: False}


def test_sync_prints_how_many_messages_went_without_their_traits(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["small", ("huge", BIG)])
    result = CliRunner().invoke(cli, ["--config", str(harness.write_config()), "sync"])
    assert result.exit_code == 0, result.output
    assert "1 message(s) sent without traits over the destination's size limit" in result.output
    assert "member huge" in result.output and "email" in result.output


# --- finding 8: a file write cut short leaves no torn line behind --------------------------------

# What the child runs: the CLI, with SIGXFSZ either left as Python sets it (ignored: the write
# fails with EFBIG) or restored to the default (the kernel kills the process mid-write).
_CLI = "import signal, sys; from sync.cli import main; {setup}sys.exit(main())"
_KILLED = "signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
# Complete lines already in the file, bigger than the state DB grows in the test: the file-size
# limit then stops the JSONL append but not the state DB's writes.
PADDING_LINES = 64
PADDING_BYTES = 64 * 1024


def _padding() -> str:
    line = json.dumps({"note": "written before this test", "pad": "p" * (PADDING_BYTES - 50)})
    return "".join(line + "\n" for _ in range(PADDING_LINES))


def _run_limited(config: Path, limit_kb: int, killed: bool) -> subprocess.CompletedProcess[str]:
    code = _CLI.format(setup=_KILLED if killed else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_CONFIG")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [
            *("bash", "-c", f'ulimit -f {limit_kb}; exec "$@"', "bash"),
            *(sys.executable, "-c", code, "--config", str(config), "sync"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("killed", [False, True], ids=["efbig", "sigxfsz"])
def test_a_file_write_cut_short_is_repaired_before_the_next_append(
    killed: bool, harness: Harness, tmp_path: Path
) -> None:
    harness.destinations = {"preview": {"type": "file", "path": "out/messages.jsonl"}}
    harness.audience["destinations"] = ["preview"]
    harness.config_extra = '\n[daemon]\nlease_seconds = "5s"\n'
    members = [f"u{i:03d}" for i in range(300)]
    harness.set_members(members)
    out = tmp_path / "out" / "messages.jsonl"
    out.parent.mkdir()
    out.write_text(_padding())
    # Room for a few dozen of the run's 300 lines (bash counts `ulimit -f` in 1024-byte blocks).
    limit_kb = out.stat().st_size // 1024 + 12
    first = _run_limited(harness.write_config(), limit_kb, killed)
    if killed:
        assert first.returncode == -signal.SIGXFSZ, first.stdout + first.stderr
        assert not out.read_bytes().endswith(b"\n")  # the kill tore the last line
    else:
        assert first.returncode != 0, first.stdout + first.stderr
        assert "cannot write" in first.stdout and "File too large" in first.stdout
        assert out.read_bytes().endswith(b"\n")  # the failed append cut off what it wrote
    assert out.stat().st_size <= limit_kb * 1024
    # Some members leave before the rerun: any `true` already in the file must be undone.
    harness.set_members(members[:200])
    report = harness.sync(wait=20)
    assert report.status == "succeeded", report.error
    lines = out.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is whole JSON
    final: dict[str, Any] = {}
    for message in parsed[PADDING_LINES:]:
        final[message["userId"]] = message["traits"][KEY]
    assert {m for m, v in final.items() if v} == set(members[:200])
    assert all(final[m] is False for m in members[200:] if m in final)
    assert parsed[:PADDING_LINES] == [json.loads(line) for line in _padding().splitlines()]


def test_a_torn_last_line_left_by_a_crash_is_cut_off(harness: Harness, tmp_path: Path) -> None:
    harness.destinations = {"preview": {"type": "file", "path": "out/messages.jsonl"}}
    harness.audience["destinations"] = ["preview"]
    out = tmp_path / "out" / "messages.jsonl"
    out.parent.mkdir()
    out.write_bytes(b'{"whole": 1}\n{"torn": "\xc3')  # even cut inside a UTF-8 sequence
    harness.set_members(["a"])
    assert harness.sync().status == "succeeded"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"whole": 1} and [m["userId"] for m in lines[1:]] == ["a"]
    out.write_bytes(b'{"torn only')
    harness.set_members(["a", "b"])
    assert harness.sync().status == "succeeded"
    assert [json.loads(line)["userId"] for line in out.read_text().splitlines()] == ["b"]


@pytest.mark.parametrize("over", [0, 1])
def test_the_size_limit_counts_a_message_s_own_bytes(over: int) -> None:
    """A message exactly at the per-message limit goes; one byte over is refused, and the
    reason gives its own size (not counting the comma that separates it in a batch)."""
    from types import SimpleNamespace

    from sync.delivery.batches import Batcher

    encoder = MessageEncoder(AudienceContext("inst", 1, KEY, "segment"))
    row = ("user", "a", None, "true", 1, "2024-05-01 10:00:00", None)
    size = len(encoder.messages(*row)[0].encode())
    limits = SimpleNamespace(
        max_batch_messages=100, max_batch_bytes=500_000, max_message_bytes=size - over
    )
    refused: list[tuple[Any, str]] = []
    batcher = Batcher(
        encoder,
        limits,  # type: ignore[arg-type]
        on_trimmed=lambda: None,
        on_oversized=refused.extend,
    )
    batches = list(batcher.batches([(*row[:4], False, *row[4:])]))
    if over:
        assert batches == []
        assert [reason for _, reason in refused] == [
            f"message is {size} bytes even without its traits, over the destination's limit "
            f"of {size - 1} bytes"
        ]
    else:
        assert refused == [] and [u.member_id for u in batches[0]] == ["a"]
