"""Alerts: after each recorded run (of ``sync``, the daemon's scheduled runs and its sweeps),
tell the configured receivers when a computation failed, was guarded (an unusual removal), was
left partial, or recovered (succeeded after one of those).

``[alerts.NAME]`` posts JSON to a webhook or a Slack incoming webhook (README "Alerts"). A
computation that keeps failing alerts once per ``repeat`` interval, counted in the state
database (``sync.state.alerts``), so every process sharing it agrees. Alerting never changes a
run: a receiver that is down, slow or refusing costs at most ``timeout`` seconds per alert and
one WARNING line naming the alert (never its URL, a secret), and the alert is tried again after
the next run.
"""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Engine

from sync import __version__
from sync.config import ComputationConfig, Config
from sync.config.models import AlertConfig, AlertEvent
from sync.errors import error_line
from sync.redaction import redact, redactor
from sync.reports import RunReport
from sync.state.alerts import (
    TROUBLE_STATUSES,
    claim_alert,
    clear_alerts,
    previous_run_status,
    release_alert,
)

logger = logging.getLogger("sync.alerts")

USER_AGENT = f"audience-sync/{__version__} (alerts)"


def alert_event(status: str, previous: str | None) -> AlertEvent | None:
    """What a run with ``status`` alerts of, given its computation's previous run's status."""
    if status == "failed":
        return "failed"
    if status == "guarded":
        return "guarded"
    if status == "partial":
        return "partial"
    if status == "succeeded" and previous in TROUBLE_STATUSES:
        return "recovered"
    return None


class Alerter:
    """Sends a config's alerts after the runs of one state database."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.alerts = config.alerts
        self.engine = engine

    def after_run(
        self, computation: ComputationConfig, audience_id: int, report: RunReport
    ) -> None:
        """Alert of the recorded run ``report`` of ``computation``, as each alert asks. Never
        raises: the run is over and recorded whatever the receivers do."""
        wanted = [(n, a) for n, a in self.alerts.items() if a.covers(computation)]
        if not wanted or report.run_id is None or report.dry_run:
            return
        key = computation.trait_key
        try:
            with self.engine.begin() as connection:
                previous = previous_run_status(connection, audience_id, report.run_id)
                event = alert_event(str(report.status), previous)
                if event == "recovered":
                    clear_alerts(connection, key)
        except Exception as exc:
            logger.warning(
                '%s "%s": no alert sent: the state database: %s',
                computation.label,
                key,
                error_line(exc),
            )
            return
        if event is None:
            return
        for name, alert in wanted:
            if event in alert.on:
                self._send(name, alert, event, computation, report, previous)

    def _send(
        self,
        name: str,
        alert: AlertConfig,
        event: AlertEvent,
        computation: ComputationConfig,
        report: RunReport,
        previous: str | None,
    ) -> None:
        """Claim (unless a recovery, which happens once), send, and give the claim back when
        the receiver did not take it."""
        key = computation.trait_key
        what = f'{event} alert for {computation.label} "{key}"'
        claimed: datetime | None = None
        try:
            if event != "recovered":
                with self.engine.begin() as connection:
                    claimed = claim_alert(connection, name, key, event, alert.repeat)
                if claimed is None:
                    logger.debug('alert "%s": %s sent within its repeat interval', name, what)
                    return
            body = payload(name, alert, event, computation, report, previous)
            problem = post(alert, body)
        except Exception as exc:  # the state DB, a bug: this alert alone is lost
            problem = error_line(exc)
        if problem is None:
            logger.info('alert "%s": sent the %s (run %s)', name, what, report.run_id)
            return
        logger.warning('alert "%s": could not send the %s: %s', name, what, problem)
        if claimed is not None:
            try:
                with self.engine.begin() as connection:
                    release_alert(connection, name, key, event, claimed)
            except Exception as exc:
                logger.warning('alert "%s": could not release its claim: %s', name, error_line(exc))


def post(alert: AlertConfig, body: dict[str, Any]) -> str | None:
    """POST ``body`` to the alert's receiver; None when it answered 2xx, else why not (one
    line without the URL)."""
    try:
        response = httpx.post(
            alert.url,
            json=body,
            timeout=alert.timeout,
            headers={"User-Agent": USER_AGENT},
        )
    except httpx.TimeoutException:
        return f"no answer within {alert.timeout:g}s"
    except httpx.HTTPError as exc:
        # httpx names the URL in some errors: the redactor knows it as a secret.
        reason = redact(str(exc)) or type(exc).__name__
        return f"cannot reach the receiver: {reason}"
    if not response.is_success:
        return f"the receiver answered HTTP {response.status_code}"
    return None


# --- what an alert says ------------------------------------------------------------------------


def summary(
    event: AlertEvent, computation: ComputationConfig, report: RunReport, previous: str | None
) -> str:
    """One line for people: what happened to which computation, in which run, and why."""
    who = f'{computation.label} "{computation.name}" ({computation.trait_key})'
    run = f"run {report.run_id}"
    if event == "recovered":
        return f"audience-sync: {who} recovered: {run} succeeded after a {previous} run"
    sent = sum(d.sent for d in report.destinations)
    counts = f"{report.members} members, {sent} sent"
    rejected = sum(d.rejected for d in report.destinations)
    failed = sum(d.failed for d in report.destinations)
    left = sum(d.left_pending for d in report.destinations)
    if rejected:
        counts += f", {rejected} rejected"
    if failed:
        counts += f", {failed} failed"
    if left:
        counts += f", {left} left pending"
    reason = report.error or next((d.error for d in report.destinations if d.error), None)
    verb = {"failed": "failed", "guarded": "was guarded", "partial": "was partial"}[event]
    return f"audience-sync: {who} {verb}: {run} ({counts})" + (f": {reason}" if reason else "")


def payload(
    name: str,
    alert: AlertConfig,
    event: AlertEvent,
    computation: ComputationConfig,
    report: RunReport,
    previous: str | None,
) -> dict[str, Any]:
    """The JSON body: Slack's ``{"text": ...}``, or the webhook's full record; redacted."""
    text = summary(event, computation, report, previous)
    if alert.type == "slack":
        body: dict[str, Any] = {"text": text}
    else:
        body = {
            "alert": name,
            "event": event,
            "text": text,
            "computation": {
                "name": computation.name,
                "key": computation.trait_key,
                "kind": computation.kind,
            },
            "run": {
                "id": report.run_id,
                "status": report.status,
                "previous_status": previous,
                "members": report.members,
                "invalid": report.invalid,
                "seconds": round(report.seconds, 3),
                "error": report.error,
            },
            "destinations": [d.shown() for d in report.destinations],
            "host": socket.gethostname(),
            "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    result: dict[str, Any] = redactor().redact_tree(body)
    return result
