"""What every command shares: the context the global options decide, the one error boundary,
the console and redacted output, options declared once, and the state engine's lifetime."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection, Engine

from sync.cli.base import AppContext, ErrorBoundaryGroup, UsageProblem, pass_app

__all__ = [
    "AppContext",
    "ErrorBoundaryGroup",
    "UsageProblem",
    "pass_app",
]
from sync.config import Config
from sync.redaction import redact, redactor
from sync.reports import EXIT_PARTIAL
from sync.state.db import make_state_engine, open_state, require_current_schema

# --- options declared once -------------------------------------------------------------------

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of text."
)

wait_option = click.option(
    "--wait",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Wait this long for an audience another process holds.",
)


# --- output ----------------------------------------------------------------------------------


def console() -> Console:
    """Where tables go: stdout; when piped, wide enough that nothing is cut. Print tables
    as ``RedactedTable`` and text through ``redact``."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(width=1000, highlight=False)


class RedactedTable(Table):
    """A table whose text cells pass through the process's redactor, before layout (a cell
    wrapped over two lines would split a secret where no later filter could see it)."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        """Add a column whose long values fold onto the next line instead of being cut with
        an ellipsis (an audience key, a member id must be read whole, even at 80 columns)."""
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        """Add a row, its text redacted."""
        # Cells are data (an error text, an install hint like `audience-sync[mysql]`), never
        # markup: rich would eat the brackets.
        super().add_row(
            *(Text(redact(r)) if isinstance(r, str) else r for r in renderables), **kwargs
        )


def _cell(value: Any) -> str:
    """A value as a table shows it: a trait group's values as JSON."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def print_table(title: str, columns: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """A titled table on the console, redacted: ``columns`` maps each heading to the key of
    its value in every row (``None`` shown empty)."""
    table = RedactedTable(title=title)
    for heading in columns:
        table.add_column(heading)
    for row in rows:
        values = (row[key] for key in columns.values())
        table.add_row(*[_cell(v) for v in values])
    console().print(table)


def echo_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON for scripts, every string redacted."""
    click.echo(json.dumps(redactor().redact_tree(payload), indent=2, default=str))


# --- the state database ----------------------------------------------------------------------


@contextmanager
def state_engine(config: Config, *, read_only: bool = False) -> Iterator[Engine]:
    """The state engine for one command, disposed when the command ends.

    Writable: the schema must be current, or is migrated first with ``[state] auto_upgrade``.
    Read-only (inspection; SQLite ``mode=ro``, PostgreSQL and MariaDB ``READ ONLY``): never
    migrates, and an out-of-date schema is refused with the command to run."""
    if read_only:
        with disposing(make_state_engine(config.state.url, read_only=True)) as engine:
            require_current_schema(engine)
            yield engine
        return
    with disposing(open_state(config.state.url, auto_upgrade=config.state.auto_upgrade)) as engine:
        yield engine


@contextmanager
def reading(config: Config) -> Iterator[Connection]:
    """A connection to a read-only state engine (see ``state_engine``), rolled back at the end."""
    with state_engine(config, read_only=True) as engine, engine.connect() as connection:
        yield connection
        connection.rollback()


@contextmanager
def disposing(engine: Engine) -> Iterator[Engine]:
    """``engine``, disposed on the way out: for the commands that look at the schema itself
    (``db``, ``check``) instead of requiring it current."""
    try:
        yield engine
    finally:
        engine.dispose()


# --- Ctrl-C ----------------------------------------------------------------------------------

logger = logging.getLogger("sync.cli")


@contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) for a command that runs audiences: the first sets ``stop`` (runs
    let their batches in flight finish and are recorded ``interrupted``), the second abandons
    the batches in flight (``KeyboardInterrupt``: the run is recorded, then the process exits
    at once with code 3 instead of waiting for the destination's answers)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (a test invoking from another)
        return

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logger.warning(
            "%s: interrupted; finishing the batches in flight (Ctrl-C again to abandon them)",
            signal.Signals(signum).name,
        )

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for which in (signal.SIGINT, signal.SIGTERM):
        previous[which] = signal.signal(which, on_signal)
    try:
        yield
    except KeyboardInterrupt:
        click.echo(
            "Interrupted: the batches in flight were abandoned; the next sync resends what "
            "may have arrived unacknowledged",
            err=True,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: the interpreter would wait for the delivery threads' answers.
        os._exit(EXIT_PARTIAL)
    finally:
        for which, handler in previous.items():
            signal.signal(which, handler)
