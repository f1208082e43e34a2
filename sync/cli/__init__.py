"""The command line: a thin skin over the library. This module builds the command tree; the
commands live in ``sync_cmds`` (running audiences), ``inspect_cmds`` (read-only looks and
``check``) and ``admin_cmds`` (the schema, retry, retire), and what they share in ``app``."""

from __future__ import annotations

import click

from sync import __version__
from sync.cli import admin_cmds, inspect_cmds, rules_cmds, sync_cmds
from sync.cli.app import AppContext, ErrorBoundaryGroup
from sync.config import DEFAULT_CONFIG_PATH
from sync.logs import configure_logging

__all__ = ["cli", "main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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


cli.add_command(sync_cmds.sync_command)
cli.add_command(sync_cmds.run_command)
cli.add_command(sync_cmds.demo)
cli.add_command(inspect_cmds.check)
cli.add_command(inspect_cmds.status)
cli.add_command(inspect_cmds.runs)
cli.add_command(inspect_cmds.members)
cli.add_command(inspect_cmds.user)
cli.add_command(admin_cmds.db)
cli.add_command(admin_cmds.retry)
cli.add_command(admin_cmds.retire)
cli.add_command(rules_cmds.show_sql)
cli.add_command(rules_cmds.preview_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="audience-sync")
