"""A local JSONL file: one Segment-spec message per line, appended and flushed per batch."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from sync.config import FileDestination as FileConfig
from sync.errors import PermanentDeliveryError


class FileDestination:
    """Appends batches to ``path`` (created with its folder), fsynced before acknowledging."""

    requires_user_id = False
    integrations: dict[str, Any] | None = None
    max_batch_bytes: int | None = None
    max_message_bytes: int | None = None
    concurrency = 1

    def __init__(self, name: str, config: FileConfig) -> None:
        self.name = name
        self.path = Path(config.path)
        self.max_batch_messages = config.batch_size
        self._lock = threading.Lock()

    def send(self, messages: list[str]) -> None:
        """Append the batch; a full or read-only disk is a permanent error for this run."""
        lines = "".join(m + "\n" for m in messages)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(lines)
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = PermanentDeliveryError(
                f'destination "{self.name}": cannot write {self.path}: {reason}'
            )
            error.outcome_unknown = True  # part of the batch may be on disk
            raise error from None

    def close(self) -> None:
        """Nothing to release: the file is opened per batch."""
