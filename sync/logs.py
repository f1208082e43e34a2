"""Logging set-up: human lines on a terminal, JSON lines on request (python-json-logger), secrets
always redacted.

A line logged during a run carries the run's id and its computation's key (``current_run``);
code that knows more passes it as ``extra``: ``destination``, ``status``, counts (``members``,
``added``, ``removed``, ``sent``, ``rejected``, ``invalid``, ``left_pending``), ``duration_ms``.
In JSON each is a field of its own (README "Logs"); a human line shows the run as a prefix and
leaves the rest to the message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sync.redaction import REDACTED, Redactor, install, redact_url, redactor

__all__ = [
    "REDACTED",
    "RunTag",
    "configure_logging",
    "current_run",
    "json_logs",
    "log_fatal",
    "redact_url",
]

logger = logging.getLogger("sync")


@dataclass(frozen=True)
class RunTag:
    """The run a log line belongs to."""

    run_id: int
    audience: str  # the computation's key


# The run a log line belongs to, set by the runner for its thread and copied into delivery
# worker threads.
current_run: ContextVar[RunTag | None] = ContextVar("current_run", default=None)


# How every delivery message names its destination (``destination "segment": …``).
_DESTINATION = re.compile(r'\bdestination "([^"]+)"')


class RunContextFilter(logging.Filter):
    """Stamps each record with the run it belongs to (``run_id``, ``audience``), if any, and
    with the ``destination`` its message names when no ``extra`` gave one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "destination"):
            named = _DESTINATION.search(record.getMessage())
            if named:
                record.destination = named.group(1)
        run = current_run.get()
        if run is not None:
            if not hasattr(record, "run_id"):
                record.run_id = run.run_id
            if not hasattr(record, "audience"):
                record.audience = run.audience
        return True


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds: ``2026-11-29T14:52:47.123Z``."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class HumanFormatter(logging.Formatter):
    """``time LEVEL [run 12 key] message``; the run is said once (a message that starts by
    naming the same computation again loses that start)."""

    def format(self, record: logging.LogRecord) -> str:
        run_id = getattr(record, "run_id", None)
        audience = getattr(record, "audience", None)
        message = record.getMessage()
        prefix = ""
        if run_id is not None:
            prefix = f"[run {run_id} {audience}] " if audience else f"[run {run_id}] "
            for repeated in (f'audience "{audience}": ', f'trait group "{audience}": '):
                message = message.removeprefix(repeated)
        line = f"{rfc3339(record.created)} {record.levelname:<7} {prefix}{message}"
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


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


def _json_formatter() -> logging.Formatter:
    """python-json-logger's formatter (imported here: ``--help`` does not pay for it), with
    our field names: ``time`` (RFC 3339, ms), ``level``, ``logger``, ``message``, then every
    ``extra`` as a field of its own and ``exception`` for a traceback."""
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(JsonFormatter):
        def add_fields(
            self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
        ) -> None:
            log_data["time"] = rfc3339(record.created)
            log_data["level"] = record.levelname
            super().add_fields(log_data, record, message_dict)

    return Formatter(
        ["name", "message"],
        rename_fields={"name": "logger", "exc_info": "exception"},
        json_ensure_ascii=False,
    )


_format = "human"


def json_logs() -> bool:
    """Whether logging was configured for JSON lines."""
    return _format == "json"


def configure_logging(level: str = "INFO", fmt: str = "human", secrets: Iterable[str] = ()) -> None:
    """Send the ``sync`` logger to stderr in the chosen format; ``secrets`` join the process's
    redactor, which every line passes through."""
    global _format
    _format = fmt
    install(Redactor(secrets))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_json_formatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(RunContextFilter())
    handler.addFilter(RedactingFilter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log_fatal(message: str, exit_code: int) -> None:
    """The error that ends the command, as one JSON line (the JSON mode's ``Error: …``)."""
    logging.getLogger("sync.cli").error(
        "%s", message, extra={"status": "error", "exit_code": exit_code}
    )
