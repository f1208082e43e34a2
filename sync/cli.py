"""The command line: a thin skin over the library. Library errors become one-line messages."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from sync import __version__
from sync.config import DEFAULT_CONFIG_PATH, Config, load_config
from sync.db import MigrationPause, make_state_engine, schema_status, upgrade
from sync.drift import drift_report
from sync.errors import (
    AudienceSyncError,
    SourceError,
    StateDatabaseMissingError,
    StateError,
    driver_reason,
    error_line,
)
from sync.logs import configure_logging
from sync.redaction import install, redact, redact_url, redactor
from sync.sources import check_source, demo_warehouse_exists

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class AppContext:
    """What the global options decided, shared with every command."""

    config_path: str
    log_level: str | None
    log_format: str
    debug: bool
    _config: Config | None = None

    def config(self) -> Config:
        """Load (once) and return the validated config; secrets are registered for redaction."""
        if self._config is None:
            self._config = load_config(self.config_path)
            # Before anything can print, log or store a text: the one redactor for all three.
            install(self._config.redactor())
            configure_logging(self.log_level or "WARNING", self.log_format)
        return self._config


class ErrorBoundaryGroup(click.Group):
    """Turns library errors into one-line messages; ``--debug`` lets the traceback through."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except AudienceSyncError as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(redact(str(exc))) from None
        except SQLAlchemyError as exc:
            if _debug(ctx):
                raise
            reason = driver_reason(exc)
            raise click.ClickException(redact(f"state database error: {reason}")) from None
        except Exception as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(
                redact(f"{error_line(exc)} (run with --debug for the traceback)")
            ) from None


def _debug(ctx: click.Context) -> bool:
    app = ctx.find_object(AppContext)
    return bool(app and app.debug)


def console() -> Console:
    """Where tables go: stdout; when piped, wide enough that nothing is cut. Print tables
    as ``RedactedTable`` and text through ``redact``."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(width=1000, highlight=False)


class RedactedTable(Table):
    """A table whose text cells pass through the process's redactor, before layout (a cell
    wrapped over two lines would split a secret where no later filter could see it)."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        """Add a row, its text redacted."""
        # Cells are data (an error text, an install hint like `audience-sync[mysql]`), never
        # markup: rich would eat the brackets.
        super().add_row(
            *(Text(redact(r)) if isinstance(r, str) else r for r in renderables), **kwargs
        )


def echo_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON for scripts, every string redacted."""
    click.echo(json.dumps(redactor().redact_tree(payload), indent=2, default=str))


@click.group(cls=ErrorBoundaryGroup)
@click.option(
    "--config",
    "config_path",
    envvar="AUDIENCE_SYNC_CONFIG",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    metavar="PATH",
    help="Config file (also AUDIENCE_SYNC_CONFIG).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="How much to log to stderr [default: WARNING; INFO for the daemon].",
)
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default="human",
    show_default=True,
    help="Log lines for people, or JSON lines for log collectors.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="audience-sync")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str, log_level: str | None, log_format: str, debug: bool
) -> None:
    """Sync SQL-defined audiences to Segment-compatible destinations as identify traits."""
    ctx.obj = AppContext(config_path, log_level, log_format, debug)
    configure_logging(log_level or "WARNING", log_format)


pass_app = click.make_pass_decorator(AppContext)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@pass_app
def check(app: AppContext, as_json: bool) -> None:
    """Validate the config and connect to the state DB and every source."""
    config = app.config()
    audiences: list[dict[str, Any]] = [
        {
            "name": a.name,
            "key": a.trait_key,
            "source": a.source,
            "destinations": list(a.destinations),
            "schedule": config.schedule_of(a).text,
            "enabled": a.enabled,
        }
        for a in config.audiences
    ]
    connections = [
        _check_state(config),
        *(_check_one_source(n, s.url, s.demo) for n, s in config.sources.items()),
    ]
    problems, warnings = _check_drift(config)
    ok = all(c["ok"] for c in connections) and not problems
    if as_json:
        echo_json(
            {
                "config": app.config_path,
                "ok": ok,
                "audiences": audiences,
                "connections": connections,
                "problems": problems,
                "warnings": warnings,
            }
        )
    else:
        out = console()
        table = RedactedTable(title=f"Audiences in {app.config_path}")
        for column in ("name", "key", "source", "destinations", "schedule", "enabled"):
            table.add_column(column)
        for a in audiences:
            table.add_row(
                a["name"],
                a["key"],
                a["source"],
                ", ".join(a["destinations"]),
                a["schedule"],
                "yes" if a["enabled"] else "no",
            )
        out.print(table)
        conns = RedactedTable(title="Connections")
        for column in ("what", "url", "status"):
            conns.add_column(column)
        for c in connections:
            status = c["detail"] if c["ok"] else Text(redact(c["detail"]), style="red")
            conns.add_row(c["what"], c["url"], status)
        out.print(conns)
        for line in problems:
            out.print(line, style="red", markup=False, soft_wrap=True)
        for line in warnings:
            out.print(f"warning: {line}", style="yellow", markup=False, soft_wrap=True)
    if not ok:
        raise click.exceptions.Exit(1)


def _check_state(config: Config) -> dict[str, Any]:
    url = redact_url(config.state.url)
    try:
        engine = make_state_engine(config.state.url, must_exist=True)
    except StateDatabaseMissingError:
        detail = "not created yet; `audience-sync db upgrade` creates it"
        return {"what": "state", "url": url, "ok": True, "detail": detail}
    except StateError as exc:
        return {"what": "state", "url": url, "ok": False, "detail": str(exc)}
    try:
        status = schema_status(engine)
    except StateError as exc:
        return {"what": "state", "url": url, "ok": False, "detail": str(exc)}
    finally:
        engine.dispose()
    detail = {
        "current": f"schema {status.current} (up to date)",
        "empty": "no schema yet; run `audience-sync db upgrade`",
        "behind": f"schema {status.current}, needs {status.head}; run `audience-sync db upgrade`",
        "ahead": f"schema {status.current} is newer than this audience-sync",
    }[status.state]
    return {"what": "state", "url": url, "ok": status.state != "ahead", "detail": detail}


def _check_drift(config: Config) -> tuple[list[str], list[str]]:
    """Drift problems and warnings (sync.drift), when the state DB is there and current."""
    try:
        engine = make_state_engine(config.state.url, must_exist=True, read_only=True)
    except StateError:
        return [], []
    try:
        if schema_status(engine).state != "current":
            return [], []
        return drift_report(engine, config)
    except StateError:
        return [], []
    finally:
        engine.dispose()


def _check_one_source(name: str, url: str, demo: bool) -> dict[str, Any]:
    if demo and not demo_warehouse_exists(url):
        detail = "demo warehouse not created yet; `audience-sync demo` or `sync` creates it"
        return {"what": f"source {name}", "url": redact_url(url), "ok": True, "detail": detail}
    try:
        check_source(name, url)
    except SourceError as exc:
        return {"what": f"source {name}", "url": redact_url(url), "ok": False, "detail": str(exc)}
    return {"what": f"source {name}", "url": redact_url(url), "ok": True, "detail": "connected"}


@cli.group()
def db() -> None:
    """Manage the state database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate to this revision.")
@click.option(
    "--test-pause-before",
    hidden=True,
    help="Test seam: stop before the first SQL statement containing this text.",
)
@click.option(
    "--test-ready-file",
    type=click.Path(path_type=Path),
    hidden=True,
    help="Test seam: created when the upgrade stops there.",
)
@pass_app
def db_upgrade(
    app: AppContext, revision: str, test_pause_before: str | None, test_ready_file: Path | None
) -> None:
    """Create or migrate the state database to this version's schema."""
    config = app.config()
    pause = None
    if test_pause_before and test_ready_file:
        pause = MigrationPause(test_pause_before, test_ready_file)
    engine = make_state_engine(config.state.url)
    try:
        before = schema_status(engine)
        upgrade(engine, revision, pause=pause)
        after = schema_status(engine)
    finally:
        engine.dispose()
    where = redact_url(config.state.url)
    if before.current == after.current:
        click.echo(f"state database {where} already at schema {after.current}")
    else:
        click.echo(
            f"state database {where} upgraded from {before.current or 'empty'} to {after.current}"
        )


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def db_current(app: AppContext, as_json: bool) -> None:
    """Show the state database's schema revision and whether it is up to date."""
    config = app.config()
    engine = make_state_engine(config.state.url, must_exist=True)
    try:
        status = schema_status(engine)
    finally:
        engine.dispose()
    if as_json:
        echo_json({"current": status.current, "head": status.head, "state": status.state})
        return
    click.echo(f"{status.current or 'empty'} (head {status.head}: {status.state})")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="audience-sync")


# Command modules register themselves on `cli` when imported.
from sync import cli_ops, cli_sync  # noqa: E402, F401
