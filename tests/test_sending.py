"""Sending one batch (sync.delivery.sending), against a fake destination: retries, backoff and
Retry-After, split-on-reject, fatal errors, and the lease check before each send. No state DB."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, cast

import pytest

from sync.delivery.batches import Unit, message_size
from sync.delivery.sending import RetryPolicy, Sender
from sync.errors import (
    CredentialsRejectedError,
    LeaseLostError,
    RejectedBatchError,
    TransientDeliveryError,
)
from sync.state.leases import Lease

# Retries without waiting noticeably.
FAST = RetryPolicy(initial_delay=0.001, max_delay=0.002, time_budget=30.0)


class FakeDestination:
    """Implements ``sync.destinations.Destination``, failing as told; ``accepted`` holds the
    member ids of every batch it took, in order."""

    name = "fake"
    max_batch_messages = 100
    max_batch_bytes: int | None = None
    max_message_bytes: int | None = None
    concurrency = 1
    requires_user_id = False
    integrations: dict[str, Any] | None = None

    def __init__(
        self,
        *,
        fail_times: int = 0,
        retry_after: float | None = None,
        outcome_unknown: bool = False,
        poisoned: frozenset[str] = frozenset(),
        credentials_rejected: bool = False,
    ) -> None:
        self.fail_times = fail_times
        self.retry_after = retry_after
        self.outcome_unknown = outcome_unknown
        self.poisoned = poisoned
        self.credentials_rejected = credentials_rejected
        self.calls: list[list[str]] = []
        self.accepted: list[str] = []

    def send(self, messages: list[str]) -> None:
        members = [json.loads(m)["userId"] for m in messages]
        self.calls.append(members)
        if self.credentials_rejected:
            raise CredentialsRejectedError('destination "fake" refused the write key (401)')
        if len(self.calls) <= self.fail_times:
            status = "429" if self.retry_after is not None else "503"
            raise TransientDeliveryError(
                f'destination "fake" answered {status}',
                self.retry_after,
                outcome_unknown=self.outcome_unknown,
            )
        bad = self.poisoned.intersection(members)
        if bad:
            raise RejectedBatchError(f'destination "fake" answered 400: bad member {min(bad)}')
        self.accepted.extend(members)

    def close(self) -> None:
        pass


class CountingLease:
    """Stands in for a ``Lease``: counts the checks before each send, lost after ``held``."""

    def __init__(self, held: int = 1_000) -> None:
        self.held = held
        self.checks = 0

    def ensure_sendable(self) -> None:
        self.checks += 1
        if self.checks > self.held:
            raise LeaseLostError("another process took the lease over")


def units(count: int, *, in_doubt: bool = False) -> list[Unit]:
    made = []
    for i in range(count):
        message = json.dumps({"userId": f"m{i}", "type": "identify"}, separators=(",", ":"))
        made.append(Unit("user", f"m{i}", 1, in_doubt, [message], message_size(message)))
    return made


def sender(
    destination: FakeDestination,
    policy: RetryPolicy = FAST,
    *,
    seconds: float = 30.0,
    stop: threading.Event | None = None,
    abort: threading.Event | None = None,
    lease: CountingLease | None = None,
) -> Sender:
    return Sender(
        destination,
        policy,
        deadline=time.monotonic() + seconds,
        stop=stop or threading.Event(),
        abort=abort or threading.Event(),
        lease=cast(Lease, lease),
    )


def test_a_batch_is_delivered_after_transient_failures() -> None:
    destination = FakeDestination(fail_times=3)
    batch = units(5)
    result = sender(destination).send(batch)
    assert result.delivered == batch
    assert result.rejected == [] and result.left == [] and result.fatal is None
    assert not result.uncertain
    assert len(destination.calls) == 4
    assert destination.accepted == [u.member_id for u in batch]


def test_a_lost_response_makes_the_delivered_batch_uncertain() -> None:
    # The destination may have applied the failed attempt: the rows stay in doubt.
    destination = FakeDestination(fail_times=1, outcome_unknown=True)
    result = sender(destination).send(units(3))
    assert len(result.delivered) == 3 and result.uncertain


def test_retries_end_with_the_batch_left_for_a_later_run() -> None:
    destination = FakeDestination(fail_times=1_000)
    policy = RetryPolicy(initial_delay=0.001, max_delay=0.002, max_attempts=5)
    batch = units(2)
    result = sender(destination, policy, seconds=0.2).send(batch)
    assert result.left == batch and result.delivered == [] and result.rejected == []
    assert result.left_reason == 'destination "fake" answered 503'
    assert result.fatal is None
    assert 0.0005 <= result.retry_delay <= 0.002
    assert len(destination.calls) >= 2


def test_retry_after_beyond_the_budget_leaves_the_batch_without_waiting() -> None:
    destination = FakeDestination(fail_times=1, retry_after=30.0)
    batch = units(4)
    started = time.monotonic()
    result = sender(destination, seconds=5.0).send(batch)
    assert time.monotonic() - started < 5.0  # it did not wait for the Retry-After
    assert result.left == batch and result.retry_delay == 30.0
    assert result.left_reason == 'destination "fake" answered 429'
    assert len(destination.calls) == 1


def test_a_short_retry_after_is_waited_out() -> None:
    destination = FakeDestination(fail_times=2, retry_after=0.01)
    result = sender(destination).send(units(2))
    assert len(result.delivered) == 2 and len(destination.calls) == 3


def test_a_poisoned_message_is_split_out_and_rejected_alone() -> None:
    destination = FakeDestination(poisoned=frozenset({"m5"}))
    lease = CountingLease()
    batch = units(8)
    result = sender(destination, lease=lease).send(batch)
    assert [u.member_id for u in result.delivered] == [f"m{i}" for i in range(8) if i != 5]
    assert result.rejected == [(batch[5], 'destination "fake" answered 400: bad member m5')]
    assert result.left == [] and result.fatal is None
    # Halves until the bad message is alone: 8 → 4+4 → 2+2 → 1+1; every other message once.
    assert sorted(destination.accepted) == sorted(u.member_id for u in result.delivered)
    assert len(destination.calls) == 7
    assert lease.checks == len(destination.calls)  # the lease is checked before every send


def test_rejected_units_keep_their_doubt() -> None:
    destination = FakeDestination(fail_times=1, outcome_unknown=True, poisoned=frozenset({"m0"}))
    result = sender(destination).send(units(1))
    assert [u.member_id for u, _ in result.rejected] == ["m0"] and result.uncertain


def test_rejected_credentials_end_the_destination_without_a_retry() -> None:
    destination = FakeDestination(credentials_rejected=True)
    batch = units(3)
    result = sender(destination).send(batch)
    assert result.fatal == 'destination "fake" refused the write key (401)'
    assert result.left == batch and result.left_reason == result.fatal
    assert result.delivered == [] and result.rejected == []
    assert len(destination.calls) == 1


@pytest.mark.parametrize("event", ["stop", "abort"])
def test_a_stop_or_an_abort_ends_the_retries(event: str) -> None:
    flag = threading.Event()
    flag.set()
    destination = FakeDestination(fail_times=1_000)
    batch = units(2)
    made = sender(destination, stop=flag) if event == "stop" else sender(destination, abort=flag)
    result = made.send(batch)
    assert result.left == batch and len(destination.calls) == 1


def test_a_lost_lease_sends_nothing() -> None:
    destination = FakeDestination()
    with pytest.raises(LeaseLostError):
        sender(destination, lease=CountingLease(held=0)).send(units(2))
    assert destination.calls == []


def test_backoff_grows_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=60.0)
    for attempt, base in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0)]:
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays)
    assert policy.backoff(0, retry_after=120.0) == 120.0
    assert policy.backoff(6, retry_after=0.5) >= 30.0  # the longer of the two


def test_a_split_stops_once_another_batch_ended_the_destination_s_delivery() -> None:
    """A worker went on splitting a rejected batch, sending its halves, after another worker's
    batch had ended delivery to the destination (a 401) (third hostile review)."""
    abort = threading.Event()

    class Aborting(FakeDestination):
        def send(self, messages: list[str]) -> None:
            try:
                super().send(messages)
            finally:
                abort.set()  # another worker's 401 lands while this batch is refused

    destination = Aborting(poisoned=frozenset({"m0"}))
    batch = units(4)
    result = sender(destination, abort=abort).send(batch)
    assert destination.calls == [["m0", "m1", "m2", "m3"]]
    assert result.left == batch and result.delivered == [] and result.rejected == []


def test_a_split_s_second_half_is_not_sent_once_another_batch_ended_delivery() -> None:
    """The abort was checked before a split only: a second half went out after another
    worker's 401 had landed while the first half was sent (fourth hostile review)."""
    abort = threading.Event()

    class AbortAfterFirstHalf(FakeDestination):
        def send(self, messages: list[str]) -> None:
            super().send(messages)
            if len(self.calls) == 2:  # the first half was taken; another worker's 401 lands
                abort.set()

    destination = AbortAfterFirstHalf(poisoned=frozenset({"m3"}))
    batch = units(4)
    result = sender(destination, abort=abort).send(batch)
    assert destination.calls == [["m0", "m1", "m2", "m3"], ["m0", "m1"]]
    assert [u.member_id for u in result.delivered] == ["m0", "m1"]
    assert [u.member_id for u in result.left] == ["m2", "m3"]
