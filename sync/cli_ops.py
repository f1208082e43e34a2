"""Daemon, inspection (read-only) and operator commands."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from sqlalchemy import Connection

from sync.cli import AppContext, RedactedTable, cli, console, echo_json, pass_app
from sync.config import Config
from sync.engine import Syncer
from sync.logs import configure_logging
from sync.scheduler import Daemon
from sync.state.db import make_state_engine, require_current_schema
from sync.state.inspection import MemberFilter, member_rows, run_rows, status_rows, user_rows
from sync.tuning import settle_heap


@contextmanager
def reading(config: Config) -> Iterator[Connection]:
    """A connection that cannot write (SQLite ``mode=ro``, PostgreSQL READ ONLY) and never
    migrates: an out-of-date schema is refused with the command to run."""
    engine = make_state_engine(config.state.url, read_only=True)
    try:
        require_current_schema(engine)
        with engine.connect() as connection:
            yield connection
            connection.rollback()
    finally:
        engine.dispose()


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = RedactedTable(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    console().print(table)


@cli.command("run")
@click.option("--once", is_flag=True, help="Run every enabled audience once, then exit.")
@pass_app
def run_command(app: AppContext, once: bool) -> None:
    """Run the daemon: every audience on its schedule until SIGTERM or SIGINT."""
    config = app.config()
    configure_logging(app.log_level or "INFO", app.log_format, config.secrets())
    with Daemon(config) as daemon:
        settle_heap()
        code = daemon.run_once() if once else daemon.serve()
    if code and not once:
        logging.shutdown()
        os._exit(code)  # runs still busy: do not wait for their threads at exit
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """One line per audience and destination: members, pending, failed, last and next run."""
    config = app.config()
    with reading(config) as connection:
        rows = status_rows(connection, config)
    if as_json:
        echo_json(rows)
        return
    _table(
        "Audiences",
        [
            "audience",
            "state",
            "destination",
            "members",
            "pending",
            "failed",
            "last run",
            "next run",
        ],
        [
            [
                r["key"],
                r["state"],
                r["destination"] or "-",
                r["members"],
                r["pending"],
                r["failed"],
                _last_run(r["last_run"]),
                r["next_run"] or "-",
            ]
            for r in rows
        ],
    )


def _last_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    return (
        f"#{run['id']} {run['status']} {run['finished_at'] or run['started_at']} "
        f"+{run['added']} -{run['removed']} sent {run['sent']}"
    )


@cli.command()
@click.argument("audience", required=False)
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="Runs to show."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_app
def runs(app: AppContext, audience: str | None, limit: int, as_json: bool) -> None:
    """Run history (newest first), optionally of one audience."""
    config = app.config()
    with reading(config) as connection:
        rows = run_rows(connection, config, audience, limit)
    if as_json:
        echo_json(rows)
        return
    columns = [
        "run",
        "audience",
        "trigger",
        "status",
        "started",
        "seconds",
        "members",
        "added",
        "removed",
        "sent",
        "rejected",
        "invalid",
        "error",
    ]
    _table(
        "Runs",
        columns,
        [
            [
                r["id"],
                r["audience"],
                r["trigger"],
                r["status"],
                r["started_at"],
                r["seconds"],
                r["members"],
                r["added"],
                r["removed"],
                r["sent"],
                r["rejected"],
                r["invalid"],
                r["error"] or "",
            ]
            for r in rows
        ],
    )


@cli.command()
@click.argument("audience")
@click.option("--destination", default=None, help="Only this destination.")
@click.option("--pending", "which", flag_value="pending", help="Only rows waiting for delivery.")
@click.option(
    "--failed", "which", flag_value="failed", help="Only rows that gave up (see `retry`)."
)
@click.option("--exited", "which", flag_value="exited", help="Ex-members instead of members.")
@click.option(
    "--limit", type=click.IntRange(1), default=100, show_default=True, help="Rows to show."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_app
def members(
    app: AppContext,
    audience: str,
    destination: str | None,
    which: MemberFilter | None,
    limit: int,
    as_json: bool,
) -> None:
    """Members of an audience (name or key), with their delivery state."""
    config = app.config()
    with reading(config) as connection:
        rows = member_rows(
            connection, config, audience, destination=destination, which=which or "all", limit=limit
        )
    if as_json:
        echo_json(rows)
        return
    _table(
        f"Members of {audience}",
        [
            "member",
            "kind",
            "destination",
            "desired",
            "synced",
            "status",
            "changed",
            "attempts",
            "last error",
        ],
        [
            [
                r["member_id"],
                r["id_kind"],
                r["destination"],
                r["desired"],
                r["synced"],
                r["status"],
                r["changed_at"],
                r["attempts"],
                r["last_error"] or "",
            ]
            for r in rows
        ],
    )


@cli.command()
@click.argument("user_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_app
def user(app: AppContext, user_id: str, as_json: bool) -> None:
    """Everything about one user (or anonymous id): every audience and destination."""
    config = app.config()
    with reading(config) as connection:
        rows = user_rows(connection, user_id)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"{user_id} is in no audience known to the state database")
        return
    _table(
        f"User {user_id}",
        [
            "audience",
            "destination",
            "desired",
            "delivered",
            "changed",
            "status",
            "attempts",
            "last error",
        ],
        [
            [
                r["audience"],
                r["destination"],
                r["desired"],
                r["synced"],
                r["changed_at"],
                r["status"],
                r["attempts"],
                r["last_error"] or "",
            ]
            for r in rows
        ],
    )


@cli.command()
@click.argument("audience")
@pass_app
def retry(app: AppContext, audience: str) -> None:
    """Re-queue an audience's failed rows for its next run."""
    config = app.config()
    with Syncer(config) as syncer:
        count = syncer.retry(audience)
    click.echo(f"{count} failed row(s) of {audience} queued for the next run")


@cli.command()
@click.argument("audience")
@click.option("--send-false", is_flag=True, help="Send false to its current members first.")
@click.option(
    "--destination",
    default=None,
    metavar="NAME",
    help="Only this destination, which the audience no longer lists (it may stay configured).",
)
@click.option(
    "--wait",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Wait this long if another process holds the audience.",
)
@pass_app
def retire(
    app: AppContext, audience: str, send_false: bool, destination: str | None, wait: float
) -> None:
    """Retire an audience removed from the config (its key stays reserved), or with
    --destination its rows at a destination it no longer lists."""
    config = app.config()
    with Syncer(config) as syncer:
        entries = syncer.retire(
            audience, destination=destination, send_false=send_false, wait=wait
        )
    sent = sum(e.sent for e in entries)
    extra = f" after sending {sent} false value(s)" if send_false else ""
    if destination is None:
        click.echo(f"audience {audience} retired{extra}; its key stays reserved")
    else:
        click.echo(f"audience {audience} left destination {destination}{extra}")
