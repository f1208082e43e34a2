"""Delivery under faults a destination causes: a 5xx after applying a batch, a redirect, a
message over the size limit, a file write cut short."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from sync.destinations.http import classify_response
from sync.models import MEMBERSHIPS
from tests.chaos import ChaosReceiver
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
    chaos = ChaosReceiver(WRITE_KEY)
    chaos.forced = f"applied-{status}"
    with chaos.running():
        harness = Harness(tmp_path, state_engine, chaos.url)
        harness.defaults["delivery_time_budget"] = "200ms"
        harness.set_members(["leaver", "stays"])
        assert harness.sync().status == "partial"
        # The gateway answered 5xx every time, but the backend applied the batch.
        assert chaos.values(KEY) == {"leaver": True, "stays": True}
        rows = harness.memberships()
        assert all(r.in_doubt and r.synced is None for r in rows.values())
        assert all(str(status) in r.last_error for r in rows.values())
        chaos.forced = None
        harness.set_members(["stays"])  # it leaves before the next run
        _retry_now(harness)
        assert harness.sync().status == "succeeded"
    assert chaos.values(KEY) == {"leaver": False, "stays": True}
    assert not chaos.log.violations
    assert not any(r.in_doubt for r in harness.memberships().values())


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
    assert row.status == "pending" and row.synced is None and not row.in_doubt
    assert len(receiver.requests) == 1  # not followed, not retried


def test_the_classifier_redacts_and_flattens_a_location() -> None:
    outcome = classify_response(
        302, httpx.Headers({"Location": "http://u:p@x.test/a b"}), "<html>moved</html>"
    )
    assert outcome.verdict == "permanent"
    assert "redirect to http://***@x.test/a b" in outcome.reason and "u:p" not in outcome.reason
    bare = classify_response(301, httpx.Headers(), "")
    assert bare.verdict == "permanent" and "without a Location" in bare.reason
