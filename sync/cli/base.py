"""The command tree's root, kept light: ``--help`` and ``--version`` must answer in well under
0.3 s (``benchmarks/cli_startup.py``), so this module imports click and nothing heavy. Command
modules are imported when their command runs (``LazyGroup``); SQLAlchemy, Alembic, pydantic,
httpx and rich load with them, not before.

Here: the context the global options decide (``AppContext``), the root group with its one error
boundary (``ErrorBoundaryGroup``), global options accepted after the command, and a fatal error
as a JSON line in JSON log mode.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sync.config import Config

# The config file read unless --config or AUDIENCE_SYNC_CONFIG says otherwise; the same value
# as sync.config.DEFAULT_CONFIG_PATH (not imported: it loads pydantic; a test compares them).
DEFAULT_CONFIG_PATH = "audience-sync.toml"


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
            from sync.config import load_config
            from sync.logs import configure_logging
            from sync.redaction import install

            self._config = load_config(self.config_path)
            # Before anything can print, log or store a text: the one redactor for all three.
            install(self._config.redactor())
            configure_logging(self.log_level or "WARNING", self.log_format)
        return self._config


pass_app = click.make_pass_decorator(AppContext)

# A command loaded when it runs: (module, attribute, its short help: the first sentence of its
# help, which the root's --help shows, cut to fit as click cuts it).
LazyCommand = tuple[str, str, str]


class LazyGroup(click.Group):
    """A group whose commands are imported on first use. ``lazy`` maps a command's name to
    ``LazyCommand``; commands added with ``add_command`` work as in any group (but their
    module is imported up front: list new commands in ``lazy``)."""

    def __init__(self, *args: Any, lazy: dict[str, LazyCommand] | None = None, **kwargs: Any):
        self._commands: dict[str, click.Command] = {}
        self.lazy = dict(lazy or {})
        super().__init__(*args, **kwargs)

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        """Every command, the lazy ones imported (for code that walks the tree)."""
        for name in self.lazy:
            self._load(name)
        return self._commands

    @commands.setter
    def commands(self, value: MutableMapping[str, click.Command]) -> None:
        self._commands = dict(value)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register an imported command."""
        name = name or cmd.name
        if name is None:
            raise TypeError("Command has no name.")
        self._commands[name] = cmd

    def _load(self, name: str) -> click.Command | None:
        if name not in self._commands and name in self.lazy:
            module, attribute, _ = self.lazy[name]
            self._commands[name] = getattr(importlib.import_module(module), attribute)
        return self._commands.get(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The root's command list, from the short helps in ``lazy`` (nothing imported)."""
        names = [
            n for n in self.list_commands(ctx) if n in self.lazy or not self._commands[n].hidden
        ]
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self._commands:
                rows.append((name, self._commands[name].get_short_help_str(limit)))
            else:
                # Cut as click cuts a command's own help, without importing the command.
                stand_in = click.Command(name, help=self.lazy[name][2])
                rows.append((name, stand_in.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class ErrorBoundaryGroup(LazyGroup):
    """The command line's one error boundary: library errors become one-line messages (their
    secrets redacted); ``--debug`` lets the traceback through."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Global options are accepted after the command too (``audience-sync sync --config
        X``): they are moved before it, up to a ``--``."""
        return super().parse_args(ctx, hoist_global_options(self, args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            app = ctx.find_object(AppContext)
            if app and app.debug:
                raise
            raise boundary_error(exc) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's standalone handling, except that with ``--log-format json`` the error that
        ends the command is one JSON line on stderr (``level``, ``message``, ``exit_code``)
        instead of ``Error: …``."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            _report_fatal(exc.format_message(), exc.exit_code, exc.show)
            sys.exit(exc.exit_code)
        except click.Abort:
            _report_fatal("aborted", 1, lambda: click.echo("Aborted!", err=True))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class UsageProblem(click.ClickException):
    """A config error or a name that matches nothing: exit code 2 (``EXIT_USAGE``), like
    click's usage errors (README "Exit codes"; nothing ran)."""

    exit_code = 2


def boundary_error(exc: Exception) -> click.ClickException:
    """The one-line error an unexpected exception becomes at the error boundary (redacted):
    a config error or an unknown name is a usage problem (exit code 2). Our own errors say
    what to do; anything else is a bug, shown with where to look."""
    from sqlalchemy.exc import SQLAlchemyError

    from sync.errors import (
        AudienceSyncError,
        ConfigError,
        UnknownAudienceError,
        driver_reason,
        error_line,
    )
    from sync.redaction import redact

    if isinstance(exc, AudienceSyncError):
        line = str(exc)
    elif isinstance(exc, SQLAlchemyError):
        line = f"state database error: {driver_reason(exc)}"
    else:
        line = f"{error_line(exc)} (run with --debug for the traceback)"
    if isinstance(exc, ConfigError | UnknownAudienceError):
        return UsageProblem(redact(line))
    return click.ClickException(redact(line))


def _report_fatal(message: str, exit_code: int, show: Callable[[], None]) -> None:
    logs = sys.modules.get("sync.logs")  # not loaded: logging was never configured
    if logs is not None and logs.json_logs():
        from sync.redaction import redact

        logs.log_fatal(redact(message), exit_code)
    else:
        show()


def hoist_global_options(group: click.Group, args: list[str]) -> list[str]:
    """``args`` with the group's own options (not ``--help``/``--version``) that follow the
    command moved before it; everything else keeps its order."""
    takes_value: dict[str, bool] = {}
    for param in group.params:
        if isinstance(param, click.Option) and not param.is_eager:
            for name in param.opts:
                takes_value[name] = not param.is_flag
    front: list[str] = []
    rest: list[str] = []
    seen_command = False
    index = 0
    while index < len(args):
        word = args[index]
        if word == "--":
            rest += args[index:]
            break
        name = word.split("=", 1)[0]
        if not seen_command:
            if not word.startswith("-"):
                seen_command = True
                rest.append(word)
            else:
                front.append(word)
                if takes_value.get(word):  # its value follows: not the command
                    index += 1
                    front += args[index : index + 1]
        elif name in takes_value:
            front.append(word)
            if takes_value[name] and "=" not in word:
                index += 1
                front += args[index : index + 1]
        else:
            rest.append(word)
        index += 1
    return front + rest
