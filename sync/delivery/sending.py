"""Sending one batch: retries with backoff, split-on-reject, and the outcome as a
``BatchResult``. No state DB here: the ledger records what this returns."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sync.delivery.batches import BatchResult, Unit, unit_keys
from sync.destinations import Destination
from sync.errors import PermanentDeliveryError, RejectedBatchError, TransientDeliveryError
from sync.state.leases import Lease

logger = logging.getLogger("sync.delivery")


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class DeliveryHooks:
    """Seams for fault drills and tests inside delivery (a hook raises to stop the delivery
    there, as a crash would), called from worker threads."""

    # Just before a batch goes to the destination (after the lease check).
    before_send: Callable[[], None] = _nothing
    # Just after the destination took a batch, before its outcome is known to the state DB.
    after_send: Callable[[], None] = _nothing
    # Before a batch's outcome is recorded.
    before_record: Callable[[], None] = _nothing


NO_HOOKS = DeliveryHooks()


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried, from ``[defaults]`` in the config."""

    initial_delay: float = 1.0
    max_delay: float = 60.0
    time_budget: float = 600.0
    max_attempts: int = 5
    # Consecutive connection failures after which delivery to a destination stops for the run.
    max_connection_failures: int = 5

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter; a destination's ``Retry-After`` wins if longer."""
        base = min(self.max_delay, self.initial_delay * (2**attempt))
        delay = random.uniform(base / 2, base)
        return max(delay, retry_after or 0.0)


# How long a destination that made a delivery give up stays "unreachable" in this process:
# meanwhile one connection failure is enough for another computation's delivery to it (a
# `sync` of many audiences would otherwise wait out the whole backoff once per audience).
UNREACHABLE_SECONDS = 300.0
_unreachable: dict[str, float] = {}  # destination name -> when delivery to it gave up
_unreachable_lock = threading.Lock()


def forget_unreachable() -> None:
    """Forget every destination given up on (a new start: tests)."""
    with _unreachable_lock:
        _unreachable.clear()


class ConnectionFailures:
    """Consecutive connection failures to one destination, counted across its workers: at
    ``limit`` delivery to it stops for the run, where a dead destination would otherwise be
    retried for the whole time budget (10 minutes by default). A destination this process
    gave up on in the last ``UNREACHABLE_SECONDS`` (``name``) needs one failure only."""

    def __init__(self, limit: int, name: str | None = None) -> None:
        self.limit = limit
        self.name = name
        # When this process last gave up on the destination, if that decided this time.
        self.given_up_at: float | None = None
        self._count = 0
        self._lock = threading.Lock()

    def failed(self) -> bool:
        """Count one connection failure; True when ``limit`` of them came in a row, or the
        destination was found unreachable lately."""
        with self._lock:
            self._count += 1
            now = time.monotonic()
            with _unreachable_lock:
                since = _unreachable.get(self.name) if self.name is not None else None
                if self._count >= self.limit and self.name is not None:
                    _unreachable[self.name] = now
            if self._count >= self.limit:
                return True
            if since is not None and now - since < UNREACHABLE_SECONDS:
                self.given_up_at = since
                return True
            return False

    def answered(self) -> None:
        """A request reached the destination (whatever it answered, or a timeout after
        connecting): it is reachable."""
        with self._lock:
            self._count = 0
            if self.name is not None:
                with _unreachable_lock:
                    _unreachable.pop(self.name, None)


class Sender:
    """Sends batches to one destination. Safe to call from several threads at once."""

    def __init__(
        self,
        destination: Destination,
        policy: RetryPolicy,
        *,
        deadline: float,
        stop: threading.Event,
        abort: threading.Event,
        lease: Lease | None = None,
        hooks: DeliveryHooks = NO_HOOKS,
    ) -> None:
        """Retries end at ``deadline`` (``time.monotonic()``), on ``stop`` (the process is
        asked to stop) or ``abort`` (another batch hit a fatal error). With a ``lease``, no
        batch is sent unless it is held long enough for the send to finish."""
        self.destination = destination
        self.policy = policy
        self.deadline = deadline
        self.stop = stop
        self.abort = abort
        self.lease = lease
        self.hooks = hooks
        self.failures = ConnectionFailures(policy.max_connection_failures, destination.name)
        # Why delivery to this destination stopped early (too many connection failures).
        self.gave_up: str | None = None
        self._gave_up_lock = threading.Lock()

    def send(self, units: list[Unit]) -> BatchResult:
        """Send one batch; every unit ends delivered, rejected or left. A fatal error (bad
        credentials, an unwritable file) leaves what was not delivered, with ``fatal`` set."""
        return self._or_fatal(units)

    def _with_retries(self, units: list[Unit]) -> BatchResult:
        attempt = 0
        uncertain = False
        while True:
            try:
                result = self._splitting(units)
                if uncertain:  # an earlier attempt held all of them
                    result.uncertain |= unit_keys(units)
                return result
            except PermanentDeliveryError as exc:
                # Refused for good now (401, 404…), but an earlier attempt may have been
                # applied (a 5xx, a timeout): the batch stays in doubt.
                exc.outcome_unknown = exc.outcome_unknown or uncertain
                raise
            except TransientDeliveryError as exc:
                uncertain = uncertain or exc.outcome_unknown
                delay = self.policy.backoff(attempt, exc.retry_after)
                attempt += 1
                left = BatchResult(
                    left=units,
                    left_reason=str(exc),
                    retry_delay=delay,
                    uncertain=unit_keys(units) if uncertain else set(),
                )
                if exc.connection_failed and self.failures.failed():
                    left.left_reason = self._give_up(exc)
                    return left
                if not exc.connection_failed:
                    self.failures.answered()
                out_of_time = time.monotonic() + delay > self.deadline
                if out_of_time or self.stop.is_set() or self.abort.is_set():
                    return left
                logger.warning("%s; retry %d in %.1fs", exc, attempt, delay)
                if self.stop.wait(delay) or self.abort.is_set():
                    return left

    def _give_up(self, exc: TransientDeliveryError) -> str:
        """Stop delivering to this destination for the run (the other workers end their
        batches too; every row stays pending); return why, logged once."""
        self.abort.set()
        with self._gave_up_lock:
            if self.gave_up is None:
                limit = self.failures.limit
                why = f"{limit} consecutive connection failure{'s' if limit > 1 else ''}"
                if self.failures.given_up_at is not None:
                    ago = time.monotonic() - self.failures.given_up_at
                    why = f"unreachable: an earlier delivery gave up on it {ago:.0f}s ago"
                self.gave_up = (
                    f"{exc}; {why}: delivery to it stops for this run, its rows stay pending"
                )
                logger.error("%s", self.gave_up)
            return self.gave_up

    def _splitting(self, units: list[Unit]) -> BatchResult:
        """Send; on a rejected batch, split it in halves until the bad messages are alone,
        unless another batch ended delivery to the destination meanwhile (``abort``: the
        units are left pending)."""
        if self.lease is not None:
            self.lease.ensure_sendable()  # after a long wait too: a run without it sends nothing
        self.hooks.before_send()
        try:
            self.destination.send([m for u in units for m in u.messages])
            self.failures.answered()
            self.hooks.after_send()
        except RejectedBatchError as exc:
            self.failures.answered()
            if len(units) == 1:
                logger.warning(
                    'destination "%s" rejected member %s: %s',
                    self.destination.name,
                    units[0].member_id,
                    exc,
                )
                return BatchResult(rejected=[(units[0], str(exc))])
            if self.abort.is_set():
                return BatchResult(left=list(units), left_reason=str(exc))
            middle = len(units) // 2
            first = self._or_fatal(units[:middle])
            if first.fatal or self.abort.is_set():  # the second half is not sent
                first.left += units[middle:]
                first.left_reason = first.left_reason or str(exc)
                return first
            second = self._or_fatal(units[middle:])
            # Each half's left units keep their own reason and delay (a 429's Retry-After is
            # not the other half's 401).
            left_why = {
                (unit.id_kind, unit.member_id): half.why(unit)
                for half in (first, second)
                for unit in half.left
            }
            return BatchResult(
                delivered=first.delivered + second.delivered,
                rejected=first.rejected + second.rejected,
                left=first.left + second.left,
                left_reason=first.left_reason or second.left_reason,
                retry_delay=max(first.retry_delay, second.retry_delay),
                uncertain=first.uncertain | second.uncertain,
                fatal=second.fatal,
                left_why=left_why,
            )
        return BatchResult(delivered=list(units))

    def _or_fatal(self, units: list[Unit]) -> BatchResult:
        """``_with_retries``, with a fatal error (401/403, 404…) as a result that leaves these
        units: in a split batch, what the other half delivered stays delivered (its members
        hold the value; the acknowledgement records it)."""
        try:
            return self._with_retries(units)
        except PermanentDeliveryError as exc:
            return BatchResult(
                left=units,
                left_reason=str(exc),
                uncertain=unit_keys(units) if exc.outcome_unknown else set(),
                fatal=str(exc),
            )
