"""A test warehouse in Segment's warehouse schema, the same rows on SQLite, PostgreSQL and
MariaDB: ``users`` and one table per event (``order_completed``, ``product_viewed``,
``app_opened``, ``checkout_started``), several thousand users, events over 120 days, a fixed
seed, some anonymous-only activity, and a one-row ``test_clock`` read by ``now_query``.

``generate()`` returns the rows as plain Python too, for the independent evaluation in
``tests/rules_oracle.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    insert,
)

SEED = 20261129
USERS = 3000
ANONYMOUS = 300
DAYS = 120
# "Now" of the generated data: every event is within DAYS before it (a few are after it, so
# that rules must ignore events later than now).
NOW = datetime(2026, 6, 1, 12, 0, 0)
NOW_QUERY = "SELECT clock_now FROM test_clock"

CATEGORIES = ["books", "games", "garden", "music", "shoes", "sports", "toys", "tools"]
PLANS = ["free", "pro", "trial"]
PLATFORMS = ["android", "ios", "web"]
CURRENCIES = ["eur", "gbp", "usd"]

# Event name → its properties (column name → type).
EVENTS: dict[str, dict[str, Any]] = {
    "Checkout Started": {"cart_value": Integer},
    "Order Completed": {"revenue": Double, "currency": String(8), "category": String(32)},
    "Product Viewed": {"category": String(32), "price": Integer},
    "App Opened": {"platform": String(16)},
}
TRAITS = {"plan": String(16), "country": String(8), "age": Integer, "email": String(64)}


def table_name(event: str) -> str:
    return event.lower().replace(" ", "_")


@dataclass
class Warehouse:
    """The generated rows: users (id → traits) and events (name → rows with user_id,
    anonymous_id, timestamp and properties)."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    now: datetime = NOW


def _metadata() -> MetaData:
    metadata = MetaData()
    binary = {"mysql_collate": "utf8mb4_bin", "mysql_charset": "utf8mb4"}
    Table(
        "users",
        metadata,
        Column("id", String(32), primary_key=True),
        *(Column(name, kind) for name, kind in TRAITS.items()),
        **binary,
    )
    for event, properties in EVENTS.items():
        name = table_name(event)
        Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("user_id", String(32)),
            Column("anonymous_id", String(32)),
            Column("timestamp", DateTime),
            *(Column(prop, kind) for prop, kind in properties.items()),
            Index(f"{name}_user", "user_id", "timestamp"),
            Index(f"{name}_anonymous", "anonymous_id"),
            **binary,
        )
    Table("test_clock", metadata, Column("clock_now", DateTime), **binary)
    return metadata


def _property(rng: random.Random, prop: str) -> Any:
    if rng.random() < 0.05:
        return None  # properties are sometimes missing
    if prop == "revenue":
        return round(rng.uniform(5, 400), 2)
    if prop == "currency":
        return rng.choice(CURRENCIES)
    if prop == "category":
        return rng.choice(CATEGORIES)
    if prop == "price":
        return rng.randint(1, 300)
    if prop == "platform":
        return rng.choice(PLATFORMS)
    return rng.randint(10, 900)  # cart_value


def generate(seed: int = SEED, users: int = USERS) -> Warehouse:
    """The rows, deterministic for a seed."""
    rng = random.Random(seed)
    warehouse = Warehouse()
    for number in range(users):
        user_id = f"u{number:05d}"
        warehouse.users[user_id] = {
            "plan": rng.choice([*PLANS, None]),
            "country": rng.choice(["de", "fr", "uk", "us"]),
            "age": rng.choice([None, *range(18, 80)]),
            "email": f"{user_id}@example.com",
        }
    owners: list[tuple[str | None, str | None]] = [
        (user_id, f"a{user_id}") for user_id in warehouse.users
    ]
    owners += [(None, f"anon{number:04d}") for number in range(ANONYMOUS)]
    # A few event rows whose user has no users row (ignored: profiles are the users table).
    owners += [(f"ghost{number}", None) for number in range(20)]
    row_id = 0
    start = NOW - timedelta(days=DAYS)
    for event, properties in EVENTS.items():
        rows: list[dict[str, Any]] = []
        activity = {"Product Viewed": 7, "App Opened": 4, "Order Completed": 2}.get(event, 1.5)
        for user_id, anonymous_id in owners:
            for _ in range(int(rng.expovariate(1 / activity))):
                row_id += 1
                seconds = rng.randint(0, (DAYS + 3) * 86_400)  # some after now
                rows.append(
                    {
                        "id": row_id,
                        "user_id": user_id,
                        "anonymous_id": anonymous_id,
                        "timestamp": start + timedelta(seconds=seconds),
                        **{prop: _property(rng, prop) for prop in properties},
                    }
                )
        # Checkouts followed by an order within hours: funnels have both outcomes.
        if event == "Order Completed":
            for checkout in list(warehouse.events.get("Checkout Started", [])):
                if rng.random() < 0.5:
                    row_id += 1
                    rows.append(
                        {
                            "id": row_id,
                            "user_id": checkout["user_id"],
                            "anonymous_id": checkout["anonymous_id"],
                            "timestamp": checkout["timestamp"]
                            + timedelta(seconds=rng.randint(60, 40 * 3600)),
                            **{prop: _property(rng, prop) for prop in properties},
                        }
                    )
        warehouse.events[event] = rows
    return warehouse


def load(engine: Engine, warehouse: Warehouse) -> None:
    """Create the tables on ``engine`` and insert the rows."""
    metadata = _metadata()
    metadata.create_all(engine)
    with engine.begin() as connection:
        users = [{"id": user_id, **traits} for user_id, traits in warehouse.users.items()]
        connection.execute(insert(metadata.tables["users"]), users)
        for event, rows in warehouse.events.items():
            connection.execute(insert(metadata.tables[table_name(event)]), rows)
        connection.execute(insert(metadata.tables["test_clock"]), [{"clock_now": warehouse.now}])


def set_clock(engine: Engine, now: datetime) -> None:
    """Move the warehouse's clock (``NOW_QUERY`` reads it)."""
    metadata = _metadata()
    with engine.begin() as connection:
        connection.execute(metadata.tables["test_clock"].update().values(clock_now=now))
