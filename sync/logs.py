"""Logging set-up: human lines on a terminal, JSON lines on request, secrets always redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from sync.redaction import REDACTED, Redactor, install, redact_url, redactor

__all__ = ["REDACTED", "configure_logging", "current_run", "redact_url"]

logger = logging.getLogger("sync")

# The run a log line belongs to ("<run id> <audience key>"), set by the runner for its thread
# and copied into delivery worker threads.
current_run: ContextVar[str | None] = ContextVar("current_run", default=None)


class RunContextFilter(logging.Filter):
    """Stamps each record with the run it belongs to, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = current_run.get()
        if run is not None and not hasattr(record, "run_id"):
            record.run_id = run
        return True


class HumanFormatter(logging.Formatter):
    """``time LEVEL [run 12 key] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(run_prefix)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "run_id", None)
        record.run_prefix = f"[run {run}] " if run else ""
        return super().format(record)


class RedactingFilter(logging.Filter):
    """Pass each record's message and traceback through the process's redactor (every
    secret, any URL userinfo)."""

    def filter(self, record: logging.LogRecord) -> bool:
        hide = redactor()
        record.msg = hide.redact(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = hide.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``run_id``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for extra in ("run_id", "audience", "destination"):
            if hasattr(record, extra):
                payload[extra] = getattr(record, extra)
        if record.exc_text:
            payload["exception"] = record.exc_text
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "human", secrets: Iterable[str] = ()) -> None:
    """Send the ``sync`` logger to stderr in the chosen format; ``secrets`` join the process's
    redactor, which every line passes through."""
    install(Redactor(secrets))
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(HumanFormatter())
    handler.addFilter(RunContextFilter())
    handler.addFilter(RedactingFilter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
