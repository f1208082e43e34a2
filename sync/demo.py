"""The demo warehouse: a deterministic SQLite database shaped like Segment's warehouse schema.

Tables: ``users``, ``identifies``, ``tracks``, ``order_completed`` and a one-row ``demo_clock``
that the demo moves forward between passes, so audiences change without waiting for real time.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import make_url

DEMO_SEED = 20261128
DEMO_USERS = 5000
DEMO_START = datetime(2026, 6, 1)
_FMT = "%Y-%m-%d %H:%M:%S"

_SCHEMA = """
CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, plan TEXT,
                    trial_ends_at TEXT, created_at TEXT, received_at TEXT);
CREATE TABLE identifies (id TEXT PRIMARY KEY, user_id TEXT, anonymous_id TEXT, email TEXT,
                         plan TEXT, timestamp TEXT, received_at TEXT);
CREATE TABLE tracks (id TEXT PRIMARY KEY, user_id TEXT, anonymous_id TEXT, event TEXT,
                     event_text TEXT, timestamp TEXT, received_at TEXT);
CREATE TABLE order_completed (id TEXT PRIMARY KEY, user_id TEXT, order_id TEXT, revenue REAL,
                              currency TEXT, timestamp TEXT, received_at TEXT);
CREATE INDEX order_completed_user ON order_completed (user_id, timestamp);
CREATE TABLE demo_clock (now TEXT NOT NULL);
"""


def demo_path(url: str) -> Path:
    """The SQLite file behind a demo source URL."""
    database = make_url(url).database
    if not database:
        raise ValueError(f"a demo source must be a SQLite file URL, not {url}")
    return Path(database)


def ensure_demo_warehouse(url: str) -> bool:
    """Create the demo warehouse behind ``url`` unless it exists; return whether it did."""
    path = demo_path(url)
    if path.exists():
        return False
    create_demo_warehouse(path)
    return True


def _add_user(db: sqlite3.Connection, rng: random.Random, number: int, now: datetime) -> str:
    user_id = f"user_{number:05d}"
    plan = rng.choices(["free", "pro", "trial"], weights=[55, 25, 20])[0]
    created = now - timedelta(days=rng.randint(0, 365))
    trial_ends = (
        (now + timedelta(days=rng.uniform(0, 30))).strftime(_FMT) if plan == "trial" else None
    )
    email = f"{user_id}@example.com"
    db.execute(
        "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            user_id,
            email,
            f"Demo User {number}",
            plan,
            trial_ends,
            created.strftime(_FMT),
            created.strftime(_FMT),
        ),
    )
    db.execute(
        "INSERT INTO identifies VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            f"idf_{number:05d}",
            user_id,
            f"anon_{number:05d}",
            email,
            plan,
            created.strftime(_FMT),
            created.strftime(_FMT),
        ),
    )
    return user_id


def _add_order(db: sqlite3.Connection, rng: random.Random, user_id: str, when: datetime) -> None:
    order_number = db.execute("SELECT COUNT(*) FROM order_completed").fetchone()[0] + 1
    stamp = when.strftime(_FMT)
    revenue = round(rng.lognormvariate(4.2, 0.8), 2)
    db.execute(
        "INSERT INTO order_completed VALUES (?, ?, ?, ?, 'USD', ?, ?)",
        (
            f"ord_evt_{order_number:07d}",
            user_id,
            f"order_{order_number:07d}",
            revenue,
            stamp,
            stamp,
        ),
    )
    db.execute(
        "INSERT INTO tracks VALUES (?, ?, NULL, 'order_completed', 'Order Completed', ?, ?)",
        (f"trk_{order_number:07d}", user_id, stamp, stamp),
    )


def create_demo_warehouse(path: Path, users: int = DEMO_USERS, seed: int = DEMO_SEED) -> None:
    """Write a fresh demo warehouse with ``users`` users and 120 days of orders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.unlink(missing_ok=True)
    with sqlite3.connect(partial) as db:
        db.executescript(_SCHEMA)
        db.execute("INSERT INTO demo_clock VALUES (?)", (DEMO_START.strftime(_FMT),))
        for number in range(1, users + 1):
            user_id = _add_user(db, rng, number, DEMO_START)
            if rng.random() < 0.45:
                for _ in range(rng.randint(1, 6)):
                    when = DEMO_START - timedelta(days=rng.uniform(0, 120))
                    _add_order(db, rng, user_id, when)
    db.close()
    partial.replace(path)  # appear whole, never half-written


def advance_demo_clock(path: Path, days: int = 3, seed: int = DEMO_SEED) -> dict[str, str | int]:
    """Move the demo clock forward, adding the orders and sign-ups of those days."""
    with sqlite3.connect(path) as db:
        before = datetime.strptime(db.execute("SELECT now FROM demo_clock").fetchone()[0], _FMT)
        after = before + timedelta(days=days)
        rng = random.Random(seed + int(after.timestamp()))
        user_ids = [r[0] for r in db.execute("SELECT id FROM users ORDER BY id")]
        orders = 0
        for user_id in rng.sample(user_ids, k=min(len(user_ids), 60 * days)):
            _add_order(db, rng, user_id, before + timedelta(days=rng.uniform(0, days)))
            orders += 1
        signups = 10 * days
        for number in range(len(user_ids) + 1, len(user_ids) + 1 + signups):
            _add_user(db, rng, number, after)
        db.execute("UPDATE demo_clock SET now = ?", (after.strftime(_FMT),))
    db.close()
    return {
        "from": before.strftime(_FMT),
        "to": after.strftime(_FMT),
        "orders": orders,
        "signups": signups,
    }
