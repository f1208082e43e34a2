"""Parsing of schedules ("15m" intervals or 5-field cron expressions) and durations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: either every ``interval_seconds`` or a cron expression."""

    text: str
    interval_seconds: float | None = None
    cron: str | None = None


def parse_duration(text: str | float | int) -> float:
    """Parse ``30s``, ``15m``, ``1h``, ``2d``, ``250ms`` or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration may not be negative: {text}")
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f'not a duration: "{text}"; write e.g. "30s", "15m" or "1h"')
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def parse_schedule(text: str) -> Schedule:
    """Parse an interval (``30s``, ``15m``, ``1h``) or a 5-field cron expression."""
    stripped = text.strip()
    hint = (
        f'not a cron expression or interval: "{text}"; write an interval such as "15m" '
        'or a 5-field cron expression such as "*/15 * * * *"'
    )
    if _DURATION.match(stripped):
        seconds = parse_duration(stripped)
        if seconds < 1:
            raise ValueError(f'an interval must be at least 1s: "{text}"')
        return Schedule(text=stripped, interval_seconds=seconds)
    if len(stripped.split()) != 5:
        raise ValueError(hint)
    from apscheduler.triggers.cron import CronTrigger

    try:
        trigger = CronTrigger.from_crontab(stripped, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"{hint} ({exc})") from None
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        # e.g. "0 0 31 2 *": every field is valid, the date never comes; the audience
        # would silently never run.
        raise ValueError(
            f'the cron expression "{text}" never fires (no such date); fix the day and month '
            'fields, or write an interval such as "1d"'
        )
    return Schedule(text=stripped, cron=stripped)
