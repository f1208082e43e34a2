"""Commands that run audiences: ``sync`` (now), ``run`` (the daemon) and ``demo``."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sync.cli.app import (
    AppContext,
    RedactedTable,
    console,
    echo_json,
    interruptible,
    json_option,
    pass_app,
    wait_option,
)
from sync.config import ComputationConfig, Config, load_config
from sync.config.starter import example_config_text
from sync.delivery import ProgressFactory
from sync.demo import advance_demo_clock, demo_path, ensure_demo_warehouse
from sync.engine import DestinationReport, RunOptions, RunReport, Syncer, resolve_computations
from sync.errors import LeaseHeldError, error_line
from sync.logs import configure_logging
from sync.redaction import redact
from sync.reports import exit_code
from sync.run.drift import warn_about_drift
from sync.scheduler import Daemon
from sync.tuning import settle_heap


@click.command("sync")
@click.argument("audiences", nargs=-1)
@click.option("--full", is_flag=True, help="Resend every member's current value (full resync).")
@click.option(
    "--include-exited", is_flag=True, help="With --full: also resend false to ex-members."
)
@click.option("--dry-run", is_flag=True, help="Plan and report, without writing state or sending.")
@click.option(
    "--force", is_flag=True, help="Proceed even when the removal guard would stop the run."
)
@wait_option
@json_option
@pass_app
def sync_command(
    app: AppContext,
    audiences: tuple[str, ...],
    full: bool,
    include_exited: bool,
    dry_run: bool,
    force: bool,
    wait: float,
    as_json: bool,
) -> None:
    """Sync audiences now (all, or those named by name or key).

    \b
    Exit codes:
      0 every planned change was acknowledged
      1 a run failed, was guarded or found its audience busy
      2 usage or config error
      3 partial: something was left pending, rejected or failed, or the sync was interrupted
    """
    if include_exited and not full:
        raise click.UsageError("--include-exited goes with --full")
    options = RunOptions(
        full=full, include_exited=include_exited, dry_run=dry_run, force=force, wait=wait
    )
    config = app.config()
    resolve_computations(config, list(audiences))  # a wrong name opens no state DB
    stop = threading.Event()
    with interruptible(stop):
        reports = run_audiences(
            config, list(audiences), options, bars=sys.stdout.isatty() and not as_json, stop=stop
        )
    if as_json:
        echo_json([r.as_dict() for r in reports])
    else:
        print_reports(reports, "Dry run (nothing written or sent)" if dry_run else "Sync")
    code = exit_code(reports)
    if code:
        raise click.exceptions.Exit(code)


@click.command("run")
@click.option("--once", is_flag=True, help="Run every enabled audience once, then exit.")
@json_option
@pass_app
def run_command(app: AppContext, once: bool, as_json: bool) -> None:
    """Run the daemon: every audience on its schedule until SIGTERM or SIGINT.

    \b
    Exit codes of --once (as sync's):
      0 every planned change was acknowledged
      1 a run failed, was guarded or found its audience busy
      2 usage or config error
      3 partial: something was left pending, rejected or failed, or a run was interrupted
    Without --once: 0 after a clean stop, 1 when runs were still busy at shutdown_timeout.
    """
    if as_json and not once:
        raise click.UsageError("--json goes with --once (the daemon logs; see --log-format)")
    config = app.config()
    configure_logging(app.log_level or "INFO", app.log_format, config.secrets())
    with Daemon(config) as daemon:
        settle_heap()
        if once:
            with interruptible(daemon.stop):
                code = daemon.run_once()
            if as_json:
                echo_json([r.as_dict() for r in daemon.once_reports])
        else:
            code = daemon.serve()
    if code and not once:
        logging.shutdown()
        os._exit(code)  # runs still busy: do not wait for their threads at exit
    if code:
        raise click.exceptions.Exit(code)


@click.command()
@click.option(
    "--dir",
    "workdir",
    default="demo",
    show_default=True,
    metavar="DIR",
    help="Folder for the demo's config, warehouse, state DB and output (recreated).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 30),
    default=3,
    show_default=True,
    help="How far the demo clock moves between the two passes.",
)
def demo(workdir: str, days: int) -> None:
    """Run the example audiences on a generated warehouse: a full send, then deltas."""
    folder = Path(workdir)
    config = _fresh_demo_config(folder)
    warehouse = config.sources["warehouse"].url
    ensure_demo_warehouse(warehouse)
    out = console()
    out.print(f"Demo folder: {folder.resolve()} (config, warehouse, state DB, out/messages.jsonl)")
    options = RunOptions(trigger="demo")
    first = run_audiences(config, [], options, bars=False)
    print_reports(first, "Pass 1: first sync, every member is sent")
    moved = advance_demo_clock(demo_path(warehouse), days=days)
    out.print(
        f"Demo clock {moved['from']} → {moved['to']}: "
        f"{moved['orders']} new orders, {moved['signups']} sign-ups"
    )
    second = run_audiences(config, [], options, bars=False)
    print_reports(second, "Pass 2: only the changes are sent")
    third = run_audiences(config, [], options, bars=False)
    sent_again = sum(d.sent for r in third for d in r.destinations)
    out.print(f"Pass 3 without changes sent {sent_again} messages.")
    messages = Path(config.destinations["preview"].path)  # type: ignore[union-attr]
    with messages.open(encoding="utf-8") as handle:
        lines = sum(1 for _ in handle)
    out.print(f"{lines} messages in {messages}; try: head -n 1 {messages}")
    if not all(r.ok for r in first + second + third):
        raise click.exceptions.Exit(1)


# Written into a demo folder: only a folder holding it (or none of the demo's files) is
# recreated, never a user's own config, state DB or output of the same names.
DEMO_MARKER = ".audience-sync-demo"


def _fresh_demo_config(folder: Path) -> Config:
    """The example config in ``folder``, its warehouse, state DB and output removed."""
    owned = ("audience-sync.toml", "audience-sync.db", "out")
    if not (folder / DEMO_MARKER).exists() and any((folder / name).exists() for name in owned):
        found = ", ".join(name for name in owned if (folder / name).exists())
        raise click.UsageError(
            f"{folder} holds {found} that the demo did not write; the demo recreates its folder, "
            "so give it another one: audience-sync demo --dir demo"
        )
    for stale in (
        "audience-sync.db",
        "audience-sync.db-wal",
        "audience-sync.db-shm",
        "demo-warehouse.db",
        "out",
    ):
        target = folder / stale
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("a folder `audience-sync demo` recreates\n")
    config_path = folder / "audience-sync.toml"
    config_path.write_text(example_config_text(), encoding="utf-8")
    # The demo is self-contained: it ignores AUDIENCE_SYNC_STATE_URL and other variables.
    return load_config(config_path, environ={})


# --- running and reporting -------------------------------------------------------------------


def run_audiences(
    config: Config,
    names: list[str],
    options: RunOptions,
    *,
    bars: bool,
    stop: threading.Event | None = None,
) -> list[RunReport]:
    """Run the named audiences (all when none), one report each; a busy or broken audience
    (missing driver, state DB error, full disk, a bug) does not stop the others, ``stop``
    does (the audiences not started are reported ``interrupted``). Audiences removed from the
    config are warned about, or, with ``on_removed = "retire"`` and no names, retired first
    (their false or nulls go before a configured computation takes over their names)."""
    # Retiring other audiences is for a run of them all, never for a named or dry one.
    retire = config.defaults.on_removed == "retire" and not names and not options.dry_run
    with Syncer(config, stop=stop) as syncer:
        warn_about_drift(syncer.engine, config, warn_orphans=not retire)
        retired = []
        if retire and not syncer.stop.is_set():
            retired = syncer.retire_orphans(force=options.force)
        with _progress_bars(bars) as progress:
            settle_heap()
            reports = []
            for audience in syncer.resolve(names):
                if syncer.stop.is_set():
                    reports.append(_not_started(audience))
                else:
                    reports.append(_run_one(syncer, audience, options, progress))
            return reports + retired


def _not_started(audience: ComputationConfig) -> RunReport:
    """The report of an audience a stopped ``sync`` did not start (no run is recorded)."""
    return RunReport(
        audience.name, audience.trait_key, "interrupted", error="not started: interrupted"
    )


def _run_one(
    syncer: Syncer,
    audience: ComputationConfig,
    options: RunOptions,
    progress: ProgressFactory | None,
) -> RunReport:
    """One audience's run as a report; this audience's boundary (the run records what it can
    itself): the state DB refusing its lease or record fails it, not the invocation."""
    try:
        return syncer.sync(audience, options, progress=progress)
    except LeaseHeldError as exc:
        return RunReport(audience.name, audience.trait_key, "busy", error=str(exc))
    except Exception as exc:
        failed = RunReport(audience.name, audience.trait_key, "failed")
        failed.error = error_line(exc)
        return failed


@contextmanager
def _progress_bars(
    enabled: bool,
) -> Iterator[Callable[[str, str, int], Callable[[int], None]] | None]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:

        def factory(key: str, destination: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"{key} → {destination}", total=total)
            return lambda n: progress.advance(task, n)

        yield factory


def print_reports(reports: list[RunReport], title: str) -> None:
    """One table row per audience and destination, then any errors."""
    table = RedactedTable(title=title)
    for column in (
        "audience",
        "destination",
        "members",
        "added",
        "removed",
        "changed",
        "sent",
        "rejected",
        "invalid",
        "skipped",
        "seconds",
        "status",
    ):
        table.add_column(
            column,
            justify="right" if column not in ("audience", "destination", "status") else "left",
        )
    for report in reports:
        rows: list[DestinationReport | None] = list(report.destinations) or [None]
        for entry in rows:
            table.add_row(
                report.key,
                entry.destination if entry else "-",
                str(report.members),
                str(entry.added) if entry else "-",
                str(entry.removed) if entry else "-",
                str(entry.changed) if entry else "-",
                str(entry.sent)
                if entry and not report.dry_run
                else ("-" if not entry else f"({entry.pending} to send)"),
                str(entry.rejected) if entry else "-",
                str(report.invalid),
                str(entry.skipped) if entry else "-",
                f"{report.seconds:.1f}",
                str(report.status),
            )
    out = console()
    out.print(table)
    for report in reports:
        if report.error:
            out.print(f"[bold]{report.key}[/bold]: {_shown(report.error)}")
        for entry in report.destinations:
            if entry.error and entry.error != report.error:
                out.print(f"[bold]{report.key} → {entry.destination}[/bold]: {_shown(entry.error)}")
            if entry.trimmed:
                out.print(
                    f"{report.key} → {entry.destination}: {entry.trimmed} message(s) sent "
                    "without traits over the destination's size limit (see the log)"
                )
        if report.invalid_samples:
            samples = "; ".join(report.invalid_samples[:3])
            out.print(f"{report.key}: {report.invalid} invalid rows, e.g. {_shown(samples)}")


def _shown(text: str) -> str:
    """Text from a run, for rich markup: redacted, and its brackets taken literally."""
    return escape(redact(text))
