"""The delivery loop for one destination: pages of pending rows → batches → a bounded pool of
workers that send (``sending``) and record (``ledger``) each batch."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from sqlalchemy import Engine

from sync.delivery.batches import Batcher, BatchResult, Unit
from sync.delivery.ledger import Ledger
from sync.delivery.sending import NO_HOOKS, DeliveryHooks, RetryPolicy, Sender
from sync.destinations import Destination
from sync.messages import AudienceContext, MessageEncoder
from sync.reports import DestinationReport
from sync.state.leases import Lease

logger = logging.getLogger("sync.delivery")

# Rows read from the state DB per page (at least one batch per worker). Each page costs a
# query and a progress write; its encoded messages (a few MB) bound delivery's memory.
PAGE_ROWS = 10_000


class Deliverer:
    """Delivers one audience's pending rows to one destination, counting into its report."""

    def __init__(
        self,
        engine: Engine,
        audience_id: int,
        context: AudienceContext,
        destination: Destination,
        policy: RetryPolicy,
        report: DestinationReport,
        *,
        deadline: float,
        stop: threading.Event | None = None,
        lease: Lease | None = None,
        progress: Callable[[int], None] | None = None,
        hooks: DeliveryHooks = NO_HOOKS,
        log: bool = True,
    ) -> None:
        """With a ``lease``, every write is fenced by it and no batch is sent without it.
        ``report`` receives ``sent``, ``rejected``, ``trimmed`` and ``error``. ``log``: append
        each message sent to the delivery ledger."""
        self.destination = destination
        self.report = report
        self.stop = stop or threading.Event()
        self.lease = lease
        self.hooks = hooks
        self.deadline = deadline
        self.progress = progress or (lambda n: None)
        self.fatal: str | None = None
        self._abort = threading.Event()
        self._lock = threading.Lock()  # the report and progress, updated by worker threads
        self.ledger = Ledger(
            engine,
            audience_id,
            context.destination,
            max_attempts=policy.max_attempts,
            lease=lease,
            log=log,
        )
        self.batcher = Batcher(
            MessageEncoder(context),
            destination,
            on_trimmed=self._trimmed,
            on_oversized=lambda rejected: self._record(
                BatchResult(rejected=rejected, handed=self.ledger.handed)
            ),
        )
        self.sender = Sender(
            destination,
            policy,
            deadline=deadline,
            stop=self.stop,
            abort=self._abort,
            lease=lease,
            hooks=hooks,
        )
        # On SQLite, whose one writer the workers would otherwise take turns on (a worker
        # waiting for its turn sends nothing), a worker hands its batch's outcome to a recorder
        # and sends its next batch: the write turn overlaps the network round trip. Two
        # recorder threads, so that outcomes queued meanwhile are committed together
        # (``Ledger._group_commit``). Elsewhere each worker records its own outcome, in
        # parallel with the others.
        self._recorder: ThreadPoolExecutor | None = None
        if engine.dialect.name == "sqlite":
            self._recorder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="record")
        self._recording: set[Future[None]] = set()  # outcomes handed over, not yet committed
        # Outcomes a worker may hand over before it waits for the recorders (memory bound).
        self._slots = threading.Semaphore(2 * max(1, destination.concurrency))
        self._abandoned = False  # a second Ctrl-C: the batches in flight are left
        self._record_failed = threading.Event()

    # --- main thread ---------------------------------------------------------------------

    def run(self) -> str | None:
        """Deliver until nothing is pending, the budget is spent, a stop is asked, or a fatal
        error (bad credentials, unwritable file) ends this destination's delivery; return that
        error, if any."""
        concurrency = max(1, self.destination.concurrency)
        page = max(PAGE_ROWS, self.destination.max_batch_messages * concurrency)
        in_flight: set[Future[None]] = set()
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="deliver")
        failed = False
        try:
            try:
                self.ledger.start()
                for rows in self.ledger.pages(page):
                    if self._should_stop():
                        break
                    self.ledger.hand_over(rows[-1][0], rows[-1][1])
                    handed = self.ledger.handed
                    for batch in self.batcher.batches(rows):
                        while len(in_flight) >= concurrency:
                            self._collect(in_flight)
                        if self._should_stop():
                            break
                        # The copied context carries the run id into the worker's logs.
                        context = contextvars.copy_context()
                        in_flight.add(pool.submit(context.run, self._deliver_batch, batch, handed))
                    if self.lease is not None:
                        self.lease.ensure_held()
                    if self._should_stop():
                        break
                self._drain(in_flight, quiet=False)
                # Not on an exception: a batch's fate may be unknown, the next run recovers.
                self.ledger.done()
            except KeyboardInterrupt:
                # A second Ctrl-C: abandon the batches in flight instead of waiting for their
                # answers. delivery_progress still covers their rows: the next run marks them
                # in doubt before planning.
                self._abandoned = True
                raise
            except BaseException:
                failed = True
                raise
            finally:
                self._abort.set()
                if not self._abandoned:
                    self._drain(in_flight, quiet=failed)
        finally:
            pool.shutdown(wait=not self._abandoned, cancel_futures=True)
            if self._recorder is not None:
                self._recorder.shutdown(wait=not self._abandoned, cancel_futures=True)
            if not self._abandoned:
                # After the pool has joined its workers: no connection is still in use.
                self.ledger.close()
        if self.sender.gave_up is not None:
            self.report.error = self.sender.gave_up  # the reason, over any one batch's
        return self.fatal

    def _should_stop(self) -> bool:
        return self.stop.is_set() or self._abort.is_set() or time.monotonic() >= self.deadline

    def _trimmed(self) -> None:
        with self._lock:
            self.report.trimmed += 1

    def _collect(self, in_flight: set[Future[None]]) -> None:
        """Wait for a batch to finish; a database error in a worker or a recorder surfaces
        here."""
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            in_flight.discard(future)
            future.result()
        with self._lock:
            recorded = {future for future in self._recording if future.done()}
            self._recording -= recorded
        for future in recorded:
            future.result()

    def _drain(self, in_flight: set[Future[None]], *, quiet: bool) -> None:
        """Wait for the batches in flight, then for every outcome handed to the recorders,
        and raise the first error — unless ``quiet``: an error is already being raised, and
        the first cause is the one the run reports."""
        first: Exception | None = None
        while in_flight:
            try:
                self._collect(in_flight)
            except Exception as error:
                first = first or error
        try:
            self._wait_recorded()
        except Exception as error:
            first = first or error
        if first is not None and not quiet:
            raise first

    def _wait_recorded(self) -> None:
        """Wait until every outcome handed to the recorders is committed (or has failed: the
        first error is raised). Called once no worker is sending any more."""
        with self._lock:
            recording, self._recording = self._recording, set()
        wait(recording)
        for future in recording:
            future.result()

    # --- worker threads -------------------------------------------------------------------

    def _deliver_batch(self, units: list[Unit], handed: list[Any]) -> None:
        """Send one batch (of the page handed over at ``handed``) and record its outcome, or on
        SQLite hand it to a recorder. The state DB writes happen off the main thread, so that
        they overlap its reading and encoding (drivers release the GIL)."""
        if self._abort.is_set():
            return
        result = self.sender.send(units)
        result.handed = handed
        if result.fatal is not None:
            self._abort.set()
            logger.error("%s", result.fatal)
            with self._lock:
                self.fatal = self.report.error = result.fatal
        if self._recorder is None:
            self._record(result)
            return
        # Wait for room among the outcomes handed over; an abandoned delivery records nothing
        # more (its rows stay covered by the progress row).
        while not self._slots.acquire(timeout=0.1):
            if self._abandoned:
                return
        context = contextvars.copy_context()
        try:
            future = self._recorder.submit(context.run, self._record_handed, result)
        except RuntimeError:  # the recorder was shut down: the delivery was abandoned
            self._slots.release()
            return
        with self._lock:
            self._recording.add(future)

    def _record_handed(self, result: BatchResult) -> None:
        """A recorder thread: record an outcome a worker handed over. A failure stops the
        delivery (as a worker's would) and is raised in the main thread; the outcomes still
        waiting are then not written (each could wait out the busy timeout of a locked state
        DB): the progress row covers their rows, which the next run resends in doubt."""
        try:
            if not self._record_failed.is_set():
                self._record(result)
        except BaseException:
            self._record_failed.set()
            self._abort.set()
            raise
        finally:
            self._slots.release()

    def _record(self, result: BatchResult) -> None:
        """Record one batch's outcome in the state DB, then count it in the report."""
        self.hooks.before_record()
        self.ledger.record(result)
        with self._lock:
            report = self.report
            report.sent += len(result.delivered)
            report.rejected += len(result.rejected)
            if result.left_reason and not report.error:
                report.error = result.left_reason
            if result.delivered:
                self.progress(len(result.delivered))
