"""Message shapes per destination type and mode, the HTTP outcome classifier, and the registry
that builds each destination type from its settings."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter

from sync.destinations import (
    DESTINATION_TYPES,
    SETTINGS_TYPES,
    DestinationSettings,
    build_destination,
)
from sync.destinations.base import type_tag
from sync.destinations.http import classify_response, parse_retry_after
from tests.harness import Harness
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"


def test_track_mode_sends_entered_and_exited(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["mode"] = "track"
    harness.set_members(["a", "b"])
    harness.sync()
    harness.set_members(["a"])
    harness.sync()
    messages = receiver.messages()
    assert [(m["type"], m["event"], m["userId"]) for m in messages] == [
        ("track", "Audience Entered", "a"),
        ("track", "Audience Entered", "b"),
        ("track", "Audience Exited", "b"),
    ]
    exited = messages[-1]
    assert exited["properties"] == {"audience_key": KEY, KEY: False}
    assert exited["context"]["traits"] == {"email": "b@example.com"}
    assert "traits" not in exited


def test_both_mode_sends_identify_and_track_with_distinct_ids(
    harness: Harness, receiver: Receiver
) -> None:
    harness.destinations["segment"]["mode"] = "both"
    harness.set_members(["a"])
    harness.sync()
    identify, track = receiver.messages()
    assert identify["type"] == "identify" and track["type"] == "track"
    assert identify["messageId"] != track["messageId"]


def test_integrations_and_personas_settings(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"].update(
        integrations={"All": False, "Intercom": True}, space_id="spa_1", namespace="spa_1"
    )
    harness.set_members(["a"])
    harness.sync()
    (message,) = receiver.messages()
    assert message["integrations"] == {"All": False, "Intercom": True}
    assert message["context"]["personas"]["space_id"] == "spa_1"


def test_an_endpoint_with_a_path_and_query_keeps_them(
    harness: Harness, receiver: Receiver
) -> None:
    # A proxy in front of Segment: /v1/batch goes after the path, the query stays a query
    # (it used to be sent to "/relay?tenant=acme/v1/batch").
    harness.destinations["segment"]["endpoint"] = receiver.url + "/relay/?tenant=acme"
    harness.set_members(["a"])
    harness.sync()
    assert [r.path for r in receiver.requests] == ["/relay/v1/batch?tenant=acme"]
    assert len(receiver.messages()) == 1
    # The batch URL pasted whole is taken as it is, not doubled ("/v1/batch/v1/batch").
    harness.destinations["segment"]["endpoint"] = receiver.url + "/v1/batch/"
    harness.set_members(["a", "b"])
    harness.sync(full=True)
    assert receiver.requests[-1].path == "/v1/batch"


def test_gzip_bodies(harness: Harness, receiver: Receiver) -> None:
    harness.destinations["segment"]["gzip"] = True
    harness.set_members(["a", "b"])
    harness.sync()
    assert receiver.requests[0].headers["content-encoding"] == "gzip"
    assert len(receiver.messages()) == 2


def test_wishpond_routes_only_to_wishpond_and_skips_anonymous(
    harness: Harness, receiver: Receiver
) -> None:
    harness.destinations = {
        "wishpond": {
            "type": "wishpond",
            "write_key": "wk_test_secret_123",
            "endpoint": receiver.url,
            "merchant_id": "12345",
        }
    }
    harness.audience["destinations"] = ["wishpond"]
    harness.audience["query"] = "SELECT user_id, anonymous_id, email FROM members"
    harness.set_members([("u1", "u1@example.com", "anon-1"), (None, "x@example.com", "anon-only")])
    report = harness.sync()
    (message,) = receiver.messages()
    assert message["userId"] == "u1" and message["anonymousId"] == "anon-1"
    assert message["integrations"] == {"All": False, "Wishpond": True}
    assert report.destinations[0].skipped == 1
    assert harness.memberships()["anon-only"].status == "skipped"
    assert report.status == "succeeded"


def test_anonymous_members_go_to_segment_as_anonymous_id(
    harness: Harness, receiver: Receiver
) -> None:
    harness.audience["query"] = "SELECT user_id, anonymous_id, email FROM members"
    harness.set_members([(None, "x@example.com", "anon-1"), ("anon-1", "y@example.com", None)])
    harness.sync()
    messages = sorted(receiver.messages(), key=lambda m: m.get("userId", ""))
    # The anonymous id "anon-1" and the user id "anon-1" are two different members.
    assert [m.get("anonymousId") for m in messages] == ["anon-1", None]
    assert [m.get("userId") for m in messages] == [None, "anon-1"]


def test_webhook_batches_are_signed(harness: Harness, receiver: Receiver) -> None:
    secret = "whsec_test_987"
    harness.destinations = {
        "hook": {"type": "webhook", "url": f"{receiver.url}/hooks/audiences", "secret": secret}
    }
    harness.audience["destinations"] = ["hook"]
    harness.set_members(["a", "b"])
    report = harness.sync()
    assert report.status == "succeeded"
    (request,) = receiver.requests
    assert request.path == "/hooks/audiences"
    expected = "sha256=" + hmac.new(secret.encode(), request.raw, hashlib.sha256).hexdigest()
    assert request.headers["x-audience-sync-signature"] == expected
    assert "authorization" not in request.headers
    assert {m["userId"] for m in request.body["batch"]} == {"a", "b"}


def test_a_gzip_webhook_is_signed_over_the_bytes_sent(harness: Harness, receiver: Receiver) -> None:
    secret = "whsec_gzip_321"
    harness.destinations = {
        "hook": {"type": "webhook", "url": f"{receiver.url}/h", "secret": secret, "gzip": True}
    }
    harness.audience["destinations"] = ["hook"]
    harness.set_members(["a", "b"])
    assert harness.sync().status == "succeeded"
    (request,) = receiver.requests
    assert request.headers["content-encoding"] == "gzip"
    # A receiver verifies the raw bytes it read, before decompressing them.
    expected = "sha256=" + hmac.new(secret.encode(), request.raw, hashlib.sha256).hexdigest()
    assert request.headers["x-audience-sync-signature"] == expected
    assert {m["userId"] for m in request.body["batch"]} == {"a", "b"}


def test_webhook_retries_like_segment(harness: Harness, receiver: Receiver) -> None:
    harness.destinations = {"hook": {"type": "webhook", "url": f"{receiver.url}/h"}}
    harness.audience["destinations"] = ["hook"]
    receiver.script = [Scripted(502)]
    harness.set_members(["a"])
    assert harness.sync().status == "succeeded"
    assert [r.status for r in receiver.requests] == [502, 200]


def test_file_destination_writes_jsonl(harness: Harness, tmp_path: Path) -> None:
    harness.destinations = {"preview": {"type": "file", "path": "out/messages.jsonl"}}
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["a", "b", "c"])
    harness.sync()
    harness.set_members(["a"])
    harness.sync()
    lines = (tmp_path / "out" / "messages.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [(m["userId"], m["traits"][KEY]) for m in parsed] == [
        ("a", True),
        ("b", True),
        ("c", True),
        ("b", False),
        ("c", False),
    ]


def test_unwritable_file_destination_fails_clearly(harness: Harness) -> None:
    # /proc refuses new files even to root: a stand-in for a full or read-only disk.
    harness.destinations = {"preview": {"type": "file", "path": "/proc/audience-sync/m.jsonl"}}
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["a"])
    report = harness.sync()
    assert report.status == "failed" and "cannot write /proc/audience-sync/m.jsonl" in report.error
    assert harness.memberships()["a"].synced_value is None


def test_file_destination_on_a_path_that_is_a_folder_fails_clearly(
    harness: Harness, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    harness.destinations = {"preview": {"type": "file", "path": "taken"}}
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["a"])
    report = harness.sync()
    assert report.status == "failed"
    assert 'destination "preview": cannot write' in report.error
    assert harness.memberships()["a"].status == "pending"


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "retry_after"),
    [
        (200, {}, '{"success": true}', "ok", None),
        (200, {}, "OK", "ok", None),
        (200, {"content-type": "text/html"}, "<html>login</html>", "transient", None),
        (400, {}, '{"error": "bad"}', "rejected", None),
        (413, {}, "", "rejected", None),
        (401, {}, "", "credentials", None),
        (403, {}, "", "credentials", None),
        (404, {}, "not found", "permanent", None),
        (429, {"retry-after": "7"}, "", "transient", 7.0),
        (429, {}, "", "transient", None),
        (500, {}, "", "transient", None),
        (503, {"retry-after": "100000"}, "", "transient", 300.0),
    ],
)
def test_classify_response(status, headers, body, verdict, retry_after) -> None:
    outcome = classify_response(status, httpx.Headers(headers), body)
    assert outcome.verdict == verdict
    assert outcome.retry_after == retry_after


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None


def test_classifier_through_an_httpx_transport() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3"}, text="slow down")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        response = client.post("http://collector.test/v1/batch")
    outcome = classify_response(response.status_code, response.headers, response.text)
    assert outcome.verdict == "transient" and outcome.retry_after == 3.0
    assert "slow down" in outcome.reason


def test_every_destination_type_builds_from_its_settings(tmp_path: Path) -> None:
    assert DESTINATION_TYPES == ("segment", "wishpond", "webhook", "file")
    required = {
        "segment": {"write_key": "wk_1", "integrations": {"All": False, "Intercom": True}},
        "wishpond": {"write_key": "wk_1"},
        "webhook": {"url": "https://hooks.example.com/in", "concurrency": 2},
        "file": {"path": str(tmp_path / "out.jsonl"), "batch_size": 7},
    }
    adapter: TypeAdapter[DestinationSettings] = TypeAdapter(DestinationSettings)
    built = {}
    for settings_type in SETTINGS_TYPES:
        tag = type_tag(settings_type)
        settings = adapter.validate_python({"type": tag, **required[tag]})
        assert type(settings) is settings_type
        built[tag] = build_destination(f"to-{tag}", settings)
    try:
        segment, wishpond, webhook, file = (built[tag] for tag in DESTINATION_TYPES)
        assert [d.name for d in built.values()] == [f"to-{tag}" for tag in DESTINATION_TYPES]
        assert segment.integrations == {"All": False, "Intercom": True}
        assert not segment.requires_user_id and segment.max_message_bytes == 32 * 1024
        assert wishpond.integrations == {"All": False, "Wishpond": True}
        assert wishpond.requires_user_id and wishpond.max_message_bytes == 32 * 1024
        assert webhook.concurrency == 2 and webhook.max_message_bytes is None
        assert file.max_batch_messages == 7 and file.concurrency == 1
    finally:
        for destination in built.values():
            destination.close()
