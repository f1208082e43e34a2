"""The status page: server-rendered HTML, read-only, no JavaScript. ``/`` lists every
computation (audiences and trait groups) with members, pending rows, its last and next
run and a chart of recent runs; ``/computations/KEY`` shows one computation's destinations,
runs and recent deliveries. Every text passes through the redactor and ``html.escape``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection

from sync.config import Config
from sync.monitor.charts import runs_chart
from sync.redaction import redact
from sync.state.daemons import DaemonView, daemon_views
from sync.state.inspection import run_rows, status_rows
from sync.state.monitoring import recent_runs

# Runs plotted per computation on the overview, and listed on a computation's page.
CHART_RUNS = 30
PAGE_RUNS = 50
# The page reloads itself (a plain meta refresh: no script).
REFRESH_SECONDS = 30

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2430}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse}th,td{padding:.3rem .6rem;border-bottom:1px solid #dde2ea;
text-align:left;vertical-align:middle}th{background:#f3f5f8;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#6b7685}
.status{padding:.05rem .4rem;border-radius:.6rem;font-size:.85em;background:#e8ebf0}
.status-succeeded{background:#d5f2dc}.status-partial{background:#fdf0c8}
.status-failed,.status-abandoned{background:#f9d4d4}.status-guarded{background:#f3dcf7}
td.when{white-space:nowrap}svg.chart line.axis{stroke:#b8c0cc}
svg.chart rect.sent{fill:#9cc3ef}svg.chart polyline.members{fill:none;stroke:#1d5fa8;
stroke-width:1.5}svg.chart circle.members{fill:#1d5fa8}.legend{font-size:.85em}
.legend .sent{color:#5b93d4}.legend .members{color:#1d5fa8}
"""


def _text(value: Any) -> str:
    """A cell's text: redacted, escaped; '-' for nothing."""
    if value is None or value == "":
        return "-"
    return escape(redact(str(value)))


def _when(iso: str | None) -> str:
    return "-" if not iso else escape(iso.replace("T", " ").replace("+00:00", " UTC"))


def _status(status: str | None) -> str:
    if not status:
        return '<span class="muted">never</span>'
    return f'<span class="status status-{escape(status)}">{escape(status)}</span>'


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _table(table_id: str, headings: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "".join(rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _daemons(daemons: list[DaemonView], this_daemon: str) -> str:
    items = []
    for d in daemons:
        state = "alive" if d.alive else f"no heartbeat for {d.seconds_since_heartbeat:.0f}s"
        mark = " (this one)" if d.id == this_daemon else ""
        items.append(
            f'<li class="daemon {"alive" if d.alive else "dead"}">{escape(d.host)} pid {d.pid}'
            f"{mark}: {escape(state)}, version {escape(d.version)}, started "
            f"{_when(d.started_at.isoformat(timespec='seconds'))}</li>"
        )
    return f'<ul id="daemons">{"".join(items)}</ul>'


def _legend() -> str:
    return (
        '<p class="legend">Charts: <span class="members">line: members</span>, '
        '<span class="sent">bars: messages sent</span>, per run, oldest on the left.</p>'
    )


def _label(kind: str) -> str:
    """How a page names a computation of ``kind``."""
    return "trait group" if kind == "trait" else "audience"


def overview_page(connection: Connection, config: Config, this_daemon: str) -> str:
    """``/``: one row per computation."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in status_rows(connection, config):
        by_key.setdefault(row["key"], []).append(row)
    charts = recent_runs(connection, CHART_RUNS)
    rows = []
    for key, entries in by_key.items():
        first = entries[0]
        last = first["last_run"] or {}
        destinations = [e["destination"] for e in entries if e["destination"]]
        rows.append(
            f'<tr class="computation" data-key="{escape(key)}">'
            f'<td><a href="computations/{quote(key)}">{escape(key)}</a>'
            f'<div class="muted">{_text(first["name"])}</div></td>'
            f"<td>{_label(first['kind'])}</td><td>{_text(first['state'])}</td>"
            f"<td>{_text(', '.join(destinations))}</td>"
            f'<td class="num members">{max(e["members"] for e in entries)}</td>'
            f'<td class="num pending">{sum(e["pending"] for e in entries)}</td>'
            f'<td class="num failed">{sum(e["failed"] for e in entries)}</td>'
            f'<td class="last-run when">{_status(last.get("status"))} '
            f"{_when(last.get('finished_at') or last.get('started_at'))}</td>"
            f'<td class="next-run when">{_when(first["next_run"])}</td>'
            f"<td>{runs_chart(charts.get(key, []))}</td></tr>"
        )
    headings = [
        "computation",
        "class",
        "state",
        "destinations",
        "members",
        "pending",
        "failed",
        "last run",
        "next run",
        "recent runs",
    ]
    body = (
        "<h1>audience-sync</h1>"
        f"<h2>Daemons</h2>{_daemons(daemon_views(connection), this_daemon)}"
        f"<h2>Computations</h2>{_table('computations', headings, rows)}{_legend()}"
        '<p class="muted">Metrics: <a href="metrics">/metrics</a> · health: '
        '<a href="healthz">/healthz</a>, <a href="readyz">/readyz</a></p>'
    )
    return _page("audience-sync status", body)


def computation_page(connection: Connection, config: Config, key: str) -> str:
    """``/computations/KEY``: destinations, runs and recent deliveries of one computation
    (``UnknownAudienceError`` when there is none)."""
    runs = run_rows(connection, config, key, PAGE_RUNS)  # raises for an unknown key
    entries = [r for r in status_rows(connection, config) if r["key"] == key]
    destination_rows = [
        f'<tr class="destination"><td>{_text(e["destination"])}</td><td>{_text(e["state"])}</td>'
        f'<td class="num">{e["members"]}</td><td class="num">{e["pending"]}</td>'
        f'<td class="num">{e["failed"]}</td></tr>'
        for e in entries
        if e["destination"]
    ]
    run_cells = [
        f'<tr class="run" data-run="{r["id"]}"><td class="num">{r["id"]}</td>'
        f"<td>{_text(r['trigger'])}</td><td>{_status(r['status'])}</td>"
        f'<td>{_when(r["started_at"])}</td><td class="num">{_text(r["seconds"])}</td>'
        f'<td class="num">{r["members"]}</td><td class="num">{r["added"]}</td>'
        f'<td class="num">{r["removed"]}</td><td class="num">{r["sent"]}</td>'
        f'<td class="num">{r["rejected"]}</td><td>{_text(r["error"])}</td></tr>'
        for r in runs
    ]
    delivery_cells = [
        f'<tr class="delivery"><td class="num">{r["id"]}</td><td>{_when(r["started_at"])}</td>'
        f'<td>{_text(d["destination"])}</td><td class="num">{d["added"]}</td>'
        f'<td class="num">{d["removed"]}</td><td class="num">{d["sent"]}</td>'
        f'<td class="num">{d["rejected"]}</td><td class="num">{d["failed"]}</td>'
        f'<td class="num">{d["left_pending"]}</td><td>{_text(d["error"])}</td></tr>'
        for r in runs
        for d in r["destinations"]
    ]
    name = entries[0]["name"] if entries else key
    state = entries[0]["state"] if entries else "-"
    label = _label(entries[0]["kind"]) if entries else "computation"
    chart = runs_chart(recent_runs(connection, CHART_RUNS, key).get(key, []))
    body = (
        '<p><a href="../">← all computations</a></p>'
        f"<h1>{escape(key)}</h1><p>{label} {_text(name)} · {_text(state)}</p>"
        f"{chart}{_legend()}"
        "<h2>Destinations</h2>"
        + _table(
            "destinations",
            ["destination", "state", "members", "pending", "failed"],
            destination_rows,
        )
        + "<h2>Runs</h2>"
        + _table(
            "runs",
            [
                "run",
                "trigger",
                "status",
                "started",
                "seconds",
                "members",
                "added",
                "removed",
                "sent",
                "rejected",
                "error",
            ],
            run_cells,
        )
        + "<h2>Recent deliveries</h2>"
        + _table(
            "deliveries",
            [
                "run",
                "started",
                "destination",
                "added",
                "removed",
                "sent",
                "rejected",
                "failed",
                "left pending",
                "error",
            ],
            delivery_cells,
        )
    )
    return _page(f"{key} · audience-sync", body)
