"""Commands that look without changing anything: ``status``, ``runs``, ``members``, ``user``
(read-only connections to the state DB) and ``check`` (the config and every connection)."""

from __future__ import annotations

from typing import Any

import click
from rich.text import Text

from sync.cli.app import (
    AppContext,
    RedactedTable,
    console,
    disposing,
    echo_json,
    json_option,
    pass_app,
    print_table,
    reading,
    state_engine,
)
from sync.config import ComputationConfig, Config
from sync.errors import SourceError, StateDatabaseMissingError, StateError
from sync.redaction import redact, redact_url
from sync.run.drift import drift_report
from sync.run.preview import column_problems
from sync.run.sources import check_source, demo_warehouse_exists
from sync.state.daemons import DaemonView, daemon_views
from sync.state.db import connection_room, make_state_engine, schema_status
from sync.state.inspection import (
    MemberFilter,
    count_member_rows,
    member_rows,
    run_rows,
    status_rows,
    user_rows,
)

# Each table's columns: heading → key of the rows sync.state.inspection returns.
STATUS_COLUMNS = {
    "audience": "key",
    "state": "state",
    "destination": "destination",
    "members": "members",
    "pending": "pending",
    "failed": "failed",
    "last run": "last_run",
    "next run": "next_run",
}
RUN_COLUMNS = {
    "run": "id",
    "audience": "audience",
    "trigger": "trigger",
    "status": "status",
    "started": "started_at",
    "seconds": "seconds",
    "members": "members",
    "added": "added",
    "removed": "removed",
    "sent": "sent",
    "rejected": "rejected",
    "failed": "failed",
    "invalid": "invalid",
    "why": "why",
}
MEMBER_COLUMNS = {
    "member": "member_id",
    "kind": "id_kind",
    "destination": "destination",
    "desired": "desired",
    "value": "value",
    "synced": "synced",
    "last sent": "last_sent",
    "sent at": "last_sent_at",
    "status": "status",
    "changed": "changed_at",
    "attempts": "attempts",
    "last error": "last_error",
}
USER_COLUMNS = {
    "audience": "audience",
    "destination": "destination",
    "desired": "desired",
    "value": "value",
    "delivered": "synced",
    "last sent": "last_sent",
    "sent at": "last_sent_at",
    "changed": "changed_at",
    "status": "status",
    "attempts": "attempts",
    "last error": "last_error",
}


@click.command()
@json_option
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Whether a daemon is running, then one line per audience and destination: members,
    pending, failed, last run and the daemon's next run."""
    config = app.config()
    with reading(config) as connection:
        rows = status_rows(connection, config)
        daemons = daemon_views(connection)
    if as_json:
        echo_json(rows)
        return
    for line in daemon_lines(daemons):
        console().print(line, markup=False, soft_wrap=True)
    shown = [
        {
            **r,
            "destination": r["destination"] or "-",
            "last_run": _last_run(r["last_run"]),
            "next_run": r["next_run"] or "-",
        }
        for r in rows
    ]
    print_table("Audiences", STATUS_COLUMNS, shown)


def daemon_lines(daemons: list[DaemonView]) -> list[str]:
    """What `status` says about daemons: each live one, or that none is running (and when a
    dead one was last heard of)."""
    alive = [d for d in daemons if d.alive]
    lines = [
        f"daemon running: {d.host} pid {d.pid} (version {d.version}, started "
        f"{d.started_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat "
        f"{d.seconds_since_heartbeat:.0f}s ago)"
        for d in alive
    ]
    if not alive:
        lines.append("no daemon is running (`audience-sync run` starts one): no runs scheduled")
        lines += [
            f"  last seen: {d.host} pid {d.pid}, heartbeat {d.seconds_since_heartbeat:.0f}s "
            "ago (it stopped without cleaning up: crashed or killed)"
            for d in daemons[:3]
        ]
    return lines


def _last_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    return (
        f"#{run['id']} {run['status']} {run['finished_at'] or run['started_at']} "
        f"+{run['added']} -{run['removed']} sent {run['sent']}"
    )


@click.command()
@click.argument("audience", required=False)
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="Runs to show."
)
@json_option
@pass_app
def runs(app: AppContext, audience: str | None, limit: int, as_json: bool) -> None:
    """Run history (newest first), optionally of one audience."""
    config = app.config()
    with reading(config) as connection:
        rows = run_rows(connection, config, audience, limit)
    if as_json:
        echo_json(rows)
        return
    print_table("Runs", RUN_COLUMNS, rows)


@click.command()
@click.argument("audience")
@click.option("--destination", default=None, help="Only this destination.")
@click.option("--pending", is_flag=True, help="Only rows waiting for delivery.")
@click.option("--failed", is_flag=True, help="Only rows that gave up (see `retry`).")
@click.option("--exited", is_flag=True, help="Ex-members instead of members.")
@click.option(
    "--limit", type=click.IntRange(1), default=100, show_default=True, help="Rows to show."
)
@click.option(
    "--offset",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Skip this many rows first (the next page: --offset 100).",
)
@json_option
@pass_app
def members(
    app: AppContext,
    audience: str,
    destination: str | None,
    pending: bool,
    failed: bool,
    exited: bool,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """Members of an audience (name or key), with their delivery state, a page at a time."""
    chosen = [
        name for name, on in (("pending", pending), ("failed", failed), ("exited", exited)) if on
    ]
    if len(chosen) > 1:
        flags = " and ".join(f"--{name}" for name in chosen)
        raise click.UsageError(f"{flags} contradict each other: choose one")
    which: MemberFilter = chosen[0] if chosen else "all"  # type: ignore[assignment]
    config = app.config()
    with reading(config) as connection:
        rows = member_rows(
            connection,
            config,
            audience,
            destination=destination,
            which=which,
            limit=limit,
            offset=offset,
        )
        total = count_member_rows(
            connection, config, audience, destination=destination, which=which
        )
    if as_json:
        echo_json(rows)
        return
    print_table(f"Members of {audience}", MEMBER_COLUMNS, rows)
    click.echo(page_caption(offset, len(rows), total))


def page_caption(offset: int, shown: int, total: int) -> str:
    """``showing 100 of 776 (rows 1-100; --offset 100 for the next page)``."""
    if total == 0:
        return "showing 0 of 0"
    if shown == 0:
        return f"showing 0 of {total} (--offset {offset} is past the end)"
    line = f"showing {shown} of {total}"
    if shown < total:
        line += f" (rows {offset + 1}-{offset + shown}"
        if offset + shown < total:
            line += f"; --offset {offset + shown} for the next page"
        line += ")"
    return line


@click.command()
@click.argument("user_id")
@json_option
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
    print_table(f"User {user_id}", USER_COLUMNS, rows)


@click.command()
@click.option(
    "--probe",
    is_flag=True,
    help="Also run each query returning no rows (columns, keys) and send each HTTP "
    "destination an empty batch (DNS, TLS, credentials).",
)
@json_option
@pass_app
def check(app: AppContext, probe: bool, as_json: bool) -> None:
    """Validate the config and connect to the state DB and every source; with --probe, also
    try each query and destination without changing anything."""
    config = app.config()
    audiences = _audience_rows(config)
    connections = [
        _check_state(config),
        *(_check_one_source(n, s.url, s.demo) for n, s in config.sources.items()),
    ]
    problems, warnings = _check_drift(config)
    problems = [*column_problems(config), *problems]
    warnings = [*_payload_warnings(config), *_connection_warnings(config), *warnings]
    probed = _probe(config) if probe else None
    ok = all(c["ok"] for c in connections) and not problems
    if probed is not None:
        ok = ok and all(p["ok"] for group in probed.values() for p in group)
    if as_json:
        payload: dict[str, Any] = {
            "config": app.config_path,
            "ok": ok,
            "audiences": audiences,
            "connections": connections,
            "problems": problems,
            "warnings": warnings,
        }
        if probed is not None:
            payload["probe"] = probed
        echo_json(payload)
    else:
        _print_check(app.config_path, audiences, connections, problems, warnings)
        if probed is not None:
            _print_probe(probed)
    if not ok:
        raise click.exceptions.Exit(1)


def _probe(config: Config) -> dict[str, list[dict[str, Any]]]:
    """``check --probe``: every query (columns, keys) and every destination, as rows."""
    from sync.destinations.probe import probe_destination
    from sync.run.probe import probe_queries

    try:
        with reading(config) as connection:
            queries = probe_queries(config, connection)
    except StateError:
        queries = probe_queries(config, None)  # no state DB yet: nothing retired, no keys held
    destinations = [probe_destination(n, s) for n, s in config.destinations.items()]
    return {
        "queries": [
            {
                "audience": q.audience,
                "key": q.key,
                "kind": q.kind,
                "ok": q.ok,
                "columns": list(q.columns),
                "detail": q.detail,
            }
            for q in queries
        ],
        "destinations": [
            {
                "destination": d.destination,
                "url": d.url,
                "ok": d.ok,
                "verdict": d.verdict,
                "detail": d.detail,
            }
            for d in destinations
        ],
    }


def _print_probe(probed: dict[str, list[dict[str, Any]]]) -> None:
    out = console()
    table = RedactedTable(title="Probe (nothing fetched, nothing sent)")
    for column in ("what", "target", "status"):
        table.add_column(column, overflow="fold")
    for q in probed["queries"]:
        detail = q["detail"] if q["ok"] else Text(redact(q["detail"]), style="red")
        table.add_row(f"{q['kind']} {q['audience']}", q["key"], detail)
    for d in probed["destinations"]:
        detail = (
            d["detail"] if d["ok"] else Text(redact(f"{d['verdict']}: {d['detail']}"), style="red")
        )
        table.add_row(f"destination {d['destination']}", d["url"], detail)
    out.print(table)


def _payload_warnings(config: Config) -> list[str]:
    """Advice on what messages carry: Engage puts ``space_id`` on every message, and some of
    Segment's destinations read it (README "Destinations")."""
    return [
        f'destination "{name}" has no space_id: Engage puts space_id (and namespace) into '
        "context.personas of every message, and some downstream destinations read it; set "
        f'space_id = "spa_…" under [destinations.{name}]'
        for name, settings in config.destinations.items()
        if settings.type == "segment" and not settings.space_id
    ]


# Connections a running computation holds besides one per delivery worker: its main thread
# (pages, hand-over), lease renewal, and a spare for progress and run records.
CONNECTIONS_PER_RUN = 3
# The daemon's own: heartbeat, scheduler sweeps, the status page and metrics.
DAEMON_CONNECTIONS = 3


def _connection_warnings(config: Config) -> list[str]:
    """A server state DB's connection limit against what the daemon may open at once: each
    delivery worker holds a connection for its whole delivery, and ``[daemon] workers``
    computations run side by side (README "The daemon"). Over the limit, runs fail
    with the server's "too many clients"; said here first."""
    needs = sorted(
        (
            max(
                (getattr(config.destinations[d], "concurrency", 1) for d in c.destinations),
                default=1,
            )
            + CONNECTIONS_PER_RUN,
            c.name,
        )
        for c in config.computations
        if c.enabled
    )
    busiest = needs[-config.daemon.workers :]
    peak = sum(need for need, _ in busiest) + DAEMON_CONNECTIONS
    try:
        engine = make_state_engine(config.state.url, must_exist=True, read_only=True)
        with disposing(engine), engine.connect() as connection:
            room = connection_room(connection)
    except StateError:
        return []
    if room is None or not busiest:
        return []
    free = room.allowed - room.in_use + 1  # this check's own connection goes away
    if peak <= free:
        return []
    return [
        f"state DB: the daemon may open {peak} connections at once ([daemon] workers = "
        f"{config.daemon.workers}; each running computation holds one per delivery worker "
        f"(its destinations' largest concurrency) plus {CONNECTIONS_PER_RUN}), but the server "
        f"allows {room.allowed} and {room.in_use} are open: lower [daemon] workers or a "
        "destination's concurrency, or raise the server's max_connections"
    ]


def _audience_rows(config: Config) -> list[dict[str, Any]]:
    return [
        {
            "name": a.name,
            "key": a.trait_key,
            "kind": a.kind,
            "source": a.source,
            "destinations": list(a.destinations),
            "schedule": _schedule_text(config, a),
            "enabled": a.enabled,
        }
        for a in config.computations
    ]


def _schedule_text(config: Config, computation: ComputationConfig) -> str:
    """An interval as written; a cron expression with the time zone it is read in."""
    schedule = config.schedule_of(computation)
    if schedule.cron is None:
        return schedule.text
    return f"{schedule.text} ({config.defaults.timezone})"


def _print_check(
    config_path: str,
    audiences: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    problems: list[str],
    warnings: list[str],
) -> None:
    out = console()
    table = RedactedTable(title=f"Audiences in {config_path}")
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


def _check_state(config: Config) -> dict[str, Any]:
    url = redact_url(config.state.url)
    try:
        with disposing(make_state_engine(config.state.url, must_exist=True)) as engine:
            status = schema_status(engine)
    except StateDatabaseMissingError:
        detail = "not created yet; `audience-sync db upgrade` creates it"
        return {"what": "state", "url": url, "ok": True, "detail": detail}
    except StateError as exc:
        return {"what": "state", "url": url, "ok": False, "detail": str(exc)}
    detail = {
        "current": f"schema {status.current} (up to date)",
        "empty": "no schema yet; run `audience-sync db upgrade`",
        "behind": f"schema {status.current}, needs {status.head}; run `audience-sync db upgrade`",
        "ahead": f"schema {status.current} is newer than this audience-sync",
    }[status.state]
    return {"what": "state", "url": url, "ok": status.state != "ahead", "detail": detail}


def _check_drift(config: Config) -> tuple[list[str], list[str]]:
    """Drift problems and warnings (sync.run.drift), when the state DB is there and current."""
    try:
        with state_engine(config, read_only=True) as engine:
            return drift_report(engine, config)
    except StateError:
        return [], []


def _check_one_source(name: str, url: str, demo: bool) -> dict[str, Any]:
    if demo and not demo_warehouse_exists(url):
        detail = "demo warehouse not created yet; `audience-sync demo` or `sync` creates it"
        return {"what": f"source {name}", "url": redact_url(url), "ok": True, "detail": detail}
    try:
        check_source(name, url)
    except SourceError as exc:
        return {"what": f"source {name}", "url": redact_url(url), "ok": False, "detail": str(exc)}
    return {"what": f"source {name}", "url": redact_url(url), "ok": True, "detail": "connected"}
