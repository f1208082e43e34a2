"""A local JSONL file: one Segment-spec message per line, appended and fsynced per batch.

A write cut short (a full disk, a file-size limit, a kill, a power cut) can leave a torn last
line. Every append first cuts the file back to its last complete line, and a failed append
cuts off what it wrote, so the file only ever holds whole JSON lines.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sync.destinations.base import BaseDestinationSettings
from sync.errors import PermanentDeliveryError

logger = logging.getLogger("sync.destinations.file")

# Bytes read per step when looking backwards for the end of the last complete line.
TAIL_READ_BYTES = 64 * 1024
# A sanity bound of our own on `batch_size` (a batch is one write and one fsync).
FILE_MAX_BATCH_MESSAGES = 100_000


class FileSettings(BaseDestinationSettings):
    """Append one Segment-spec message per line to a local JSONL file."""

    type: Literal["file"]
    path: str
    batch_size: int = Field(default=1000, gt=0, le=FILE_MAX_BATCH_MESSAGES)


def _last_line_end(fd: int, size: int) -> int:
    """The file size up to and including its last newline (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - TAIL_READ_BYTES)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may write fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FileDestination:
    """Appends batches to ``path`` (created with its folder), fsynced before acknowledging."""

    requires_user_id = False
    integrations: dict[str, Any] | None = None
    max_batch_bytes: int | None = None
    max_message_bytes: int | None = None
    concurrency = 1

    def __init__(self, name: str, settings: FileSettings) -> None:
        self.name = name
        self.path = Path(settings.path)
        self.max_batch_messages = settings.batch_size
        self._lock = threading.Lock()

    def send(self, messages: list[str]) -> None:
        """Append the batch; a full or read-only disk is a permanent error for this run."""
        data = "".join(m + "\n" for m in messages).encode("utf-8")
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
                try:
                    # Another process (or destination) appending to the same file waits: its
                    # half-written line must not look torn to us.
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    self._append(fd, data)
                finally:
                    os.close(fd)  # releases the lock
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = PermanentDeliveryError(
                f'destination "{self.name}": cannot write {self.path}: {reason}'
            )
            # Whole lines of the batch may have been read from the file before it was cut back.
            error.outcome_unknown = True
            raise error from None

    def _append(self, fd: int, data: bytes) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe or a device: nothing to cut back
            _write_all(fd, data)
            return
        start = self._repair(fd)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            # Best effort: if this fails too, the next append cuts the torn line off.
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass
            raise

    def _repair(self, fd: int) -> int:
        """Cut a torn last line off (left by a write that was interrupted); return the size."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        end = _last_line_end(fd, size)
        logger.warning(
            'destination "%s": %s ended in an incomplete line of %d bytes (an interrupted '
            "write); cut it off",
            self.name,
            self.path,
            size - end,
        )
        os.ftruncate(fd, end)
        os.fsync(fd)
        return end

    def close(self) -> None:
        """Nothing to release: the file is opened per batch."""
