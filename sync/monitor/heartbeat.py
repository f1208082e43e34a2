"""The daemon's heartbeat thread: renews its ``daemons`` row, writes its next run times and
refreshes the state-DB gauges, every ``HEARTBEAT_SECONDS`` or at once when woken."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine

from sync import __version__
from sync.clock import StateClock
from sync.errors import error_line
from sync.state.daemons import (
    ALIVE_SECONDS,
    HEARTBEAT_SECONDS,
    beat,
    register_daemon,
    unregister_daemon,
)

logger = logging.getLogger("sync.daemon")

NextRuns = Callable[[], dict[str, datetime]]


class Heartbeat:
    """``start`` registers the daemon, ``stop`` deletes its row; in between a thread beats.

    ``next_runs`` gives the scheduler's next run time (this host's clock) per computation
    key; they are stored on the state DB's clock, like the heartbeat. ``after_beat`` runs on
    the same connection after each beat (the metrics' state gauges)."""

    def __init__(
        self,
        engine: Engine,
        daemon_id: str,
        next_runs: NextRuns,
        *,
        after_beat: Callable[..., None] | None = None,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.engine = engine
        self.daemon_id = daemon_id
        self.next_runs = next_runs
        self.after_beat = after_beat
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock_offset = timedelta(0)
        self._last_ok: float | None = None  # monotonic time of the last successful beat
        self._failing = False

    def start(self) -> None:
        """Insert the daemon's row and start beating."""
        with self.engine.begin() as connection:
            self._clock_offset = StateClock(connection).offset
            self._register(connection)
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _register(self, connection: Connection) -> None:
        register_daemon(
            connection,
            self.daemon_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
        )

    def wake(self) -> None:
        """Beat now (a run finished: its next run time and the gauges changed)."""
        self._wake.set()

    @property
    def healthy(self) -> bool:
        """Whether the last successful beat is recent enough for the daemon to count alive."""
        last = self._last_ok
        return last is not None and time.monotonic() - last <= ALIVE_SECONDS

    def stop(self) -> None:
        """Stop beating and delete the daemon's row (a clean stop)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self.engine.begin() as connection:
                unregister_daemon(connection, self.daemon_id)
        except Exception as exc:
            logger.warning("could not remove this daemon's heartbeat row: %s", error_line(exc))

    def beat_once(self) -> None:
        """One beat: renew, write next runs, refresh; re-register when the row vanished."""
        offset = self._clock_offset
        next_runs = {k: v + offset for k, v in self.next_runs().items()}
        with self.engine.begin() as connection:
            if not beat(connection, self.daemon_id, next_runs):
                logger.warning("this daemon's heartbeat row was gone; registering it again")
                self._register(connection)
                beat(connection, self.daemon_id, next_runs)
        if self.after_beat is not None:
            with self.engine.connect() as connection:
                self.after_beat(connection)
                connection.rollback()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a wake during this beat makes the next wait return at once
            try:
                self.beat_once()
            except Exception as exc:
                if not self._failing:
                    logger.warning("heartbeat failed (will retry): %s", error_line(exc))
                self._failing = True
            else:
                if self._failing:
                    logger.info("heartbeat recovered")
                self._failing = False
                self._last_ok = time.monotonic()
            self._wake.wait(self.interval)
