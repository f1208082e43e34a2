"""The command line: a thin skin over the library. This module builds the command tree; the
commands live in ``sync_cmds`` (running audiences), ``inspect_cmds`` (read-only looks and
``check``), ``admin_cmds`` (the schema, retry, retire) and ``init_cmd``, and are imported only
when they run (``LAZY_COMMANDS``): ``--help`` and ``--version`` import click alone
(``benchmarks/cli_startup.py``). What commands share is in ``app``; the root in ``base``."""

from __future__ import annotations

import click

from sync import __version__
from sync.cli.base import DEFAULT_CONFIG_PATH, AppContext, ErrorBoundaryGroup, LazyCommand

__all__ = ["LAZY_COMMANDS", "cli", "main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# name → (module, attribute, short help shown by `audience-sync --help`; a test keeps it equal
# to the command's own). A new command goes here, not through add_command: importing its
# module up front would load SQLAlchemy for `--help`.
LAZY_COMMANDS: dict[str, LazyCommand] = {
    "sync": (
        "sync.cli.sync_cmds",
        "sync_command",
        "Sync audiences now (all, or those named by name or key).",
    ),
    "run": (
        "sync.cli.sync_cmds",
        "run_command",
        "Run the daemon: every audience on its schedule until SIGTERM or SIGINT.",
    ),
    "demo": (
        "sync.cli.sync_cmds",
        "demo",
        "Run the example audiences on a generated warehouse: a full send, then deltas.",
    ),
    "check": (
        "sync.cli.inspect_cmds",
        "check",
        "Validate the config and connect to the state DB and every source; with --probe, also "
        "try each query and destination without changing anything.",
    ),
    "status": (
        "sync.cli.inspect_cmds",
        "status",
        "Whether a daemon is running, then one line per audience and destination: members, "
        "pending, failed, last run and the daemon's next run.",
    ),
    "runs": (
        "sync.cli.inspect_cmds",
        "runs",
        "Run history (newest first), optionally of one audience.",
    ),
    "members": (
        "sync.cli.inspect_cmds",
        "members",
        "Members of an audience (name or key), with their delivery state, a page at a time.",
    ),
    "user": (
        "sync.cli.inspect_cmds",
        "user",
        "Everything about one user (or anonymous id): every audience and destination.",
    ),
    "db": ("sync.cli.admin_cmds", "db", "Manage the state database schema."),
    "init": (
        "sync.cli.init_cmd",
        "init",
        "Write a commented audience-sync.toml and a .env.example into the current folder "
        "(refuses to overwrite either).",
    ),
    "retry": (
        "sync.cli.admin_cmds",
        "retry",
        "Re-queue an audience's failed rows for its next run.",
    ),
    "retire": (
        "sync.cli.admin_cmds",
        "retire",
        "Retire an audience or trait group removed from the config (its key stays reserved), "
        "or with --destination its rows at a destination it no longer lists.",
    ),
    "show-sql": (
        "sync.cli.rules_cmds",
        "show_sql",
        "Print the SQL an audience or trait group runs on its source (rules compiled for the "
        "source's dialect; bound values listed after it).",
    ),
    "preview": (
        "sync.cli.rules_cmds",
        "preview_command",
        "Run an audience or trait group on its source and show its member count and a sample; "
        "nothing is written or sent.",
    ),
}


@click.group(cls=ErrorBoundaryGroup, lazy=LAZY_COMMANDS)
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
    """Sync SQL-defined audiences to Segment-compatible destinations as identify traits.

    Global options (--config, --log-level, --log-format, --debug) may also follow the
    command: `audience-sync sync --config prod.toml`.
    """
    from sync.logs import configure_logging

    ctx.obj = AppContext(config_path, log_level, log_format, debug)
    configure_logging(log_level or "WARNING", log_format)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="audience-sync")
