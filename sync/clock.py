"""Time as the state database tells it.

Leases, ``changed_at`` (each message's ``timestamp``) and retry times are compared across
hosts, so they come from one clock: the state database's. On SQLite every process shares one
machine, whose clock is the database's. ``local_now`` is the one place this package reads the
host's clock for them; fault drills and tests shift it to play a host whose clock is wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, text


def local_now() -> datetime:
    """This host's clock, timezone-aware, in UTC."""
    return datetime.now(UTC)


# The database's current time, read fresh for each statement (not the transaction's start).
_NOW_SQL = {
    "postgresql": "SELECT clock_timestamp()",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",
}


def state_now(connection: Connection) -> datetime:
    """The state database's current time (the host's on SQLite), timezone-aware, in UTC."""
    sql = _NOW_SQL.get(connection.dialect.name)
    if sql is None:
        return local_now()
    value: datetime = connection.execute(text(sql)).scalar_one()
    if value.tzinfo is None:  # MySQL's UTC_TIMESTAMP has no zone
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class StateClock:
    """The state database's time without a query each time: the offset between it and this
    host's clock, measured once (a run's worth of drift is negligible; a skew of minutes is
    not)."""

    def __init__(self, connection: Connection) -> None:
        self.offset = timedelta(0)
        if connection.dialect.name not in _NOW_SQL:
            return  # SQLite: the host's clock is the database's
        before = local_now()
        database = state_now(connection)
        after = local_now()
        # The database read its clock somewhere between our two readings: take the middle.
        self.offset = database - (before + (after - before) / 2)

    def now(self) -> datetime:
        """The state database's current time, estimated from this host's clock."""
        return local_now() + self.offset


def stored_utc(value: datetime | str) -> datetime:
    """A stored timestamp as the driver returns it, timezone-aware in UTC: SQLite gives text
    without a zone (always UTC here), PostgreSQL an aware datetime."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
