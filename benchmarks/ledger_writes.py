"""What the delivery ledger costs the SQLite state DB's one writer, and whether making the
ledger *the* acknowledgement (append rows per batch, fold them into ``memberships`` once per
page) would cost less.

    uv run python benchmarks/ledger_writes.py [--members 100000] [--repeat 3]

A state DB is planned once (every row pending), then copied for each variant, which writes the
acknowledgements of all its rows in batches of 500, four batches per transaction (as grouped
commits do), with the statements ``sync/delivery/ledger.py`` issues:

- ``ack``: the compare-and-set UPDATE of each batch (the ledger off; ``Ledger._ack`` as it
  compiles on SQLite, with its constants inlined);
- ``ack + ledger``: that and the batch's ``INSERT … SELECT`` of ledger rows (the ledger on:
  ``Ledger``'s own statement);
- ``ledger, folded per page``: only the ``INSERT … SELECT`` per batch, then once per 10,000
  rows one set-based UPDATE of ``memberships`` from the ledger rows appended since (version
  compare-and-set, as the per-batch UPDATE does).

Writer time only: no HTTP, no encoding. Prints the median seconds of each variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import Env
from sync.delivery.ledger import Ledger
from sync.reports import RunOptions

BATCH = 500
GROUP = 4  # batches per transaction
PAGE = 10_000
NOW = "2026-11-29 20:00:00.000000"
WHERE = "audience_id = 1 AND destination = 'segment' AND id_kind = 'user'"
ACK = (
    "UPDATE memberships SET synced_value = value, in_doubt = 0, status = 'in_sync', "
    "attempts = 0, next_attempt_at = NULL, last_error = NULL, delivered_at = ? "
    f"WHERE {WHERE} AND member_id IN (SELECT value FROM json_each(?)) AND version = 1"
)
FOLD = (
    "WITH d AS MATERIALIZED (SELECT id_kind, member_id, version, value, acknowledged_at "
    "FROM deliveries WHERE id > ? AND audience_id = 1 AND destination = 'segment' "
    "AND outcome = 'acknowledged') "
    "UPDATE memberships SET synced_value = d.value, in_doubt = 0, status = 'in_sync', "
    "attempts = 0, next_attempt_at = NULL, last_error = NULL, delivered_at = d.acknowledged_at "
    "FROM d WHERE memberships.audience_id = 1 AND memberships.destination = 'segment' "
    "AND memberships.id_kind = d.id_kind AND memberships.member_id = d.member_id "
    "AND memberships.version = d.version"
)


BATCH_TABLE = (
    "CREATE TABLE delivery_batches (id INTEGER PRIMARY KEY, batch_id TEXT, audience_id INT, "
    "destination TEXT, message_type TEXT, outcome TEXT, sent_at TEXT, acknowledged_at TEXT, "
    "messages TEXT)"
)
BATCH_ROW = (
    "INSERT INTO delivery_batches (batch_id, audience_id, destination, message_type, outcome, "
    "sent_at, acknowledged_at, messages) SELECT ?, 1, 'segment', 'identify', 'acknowledged', ?, ?, "
    "json_group_array(json_array(m.member_id, j.value, m.value, m.traits, m.version)) "
    "FROM json_each(?) AS j CROSS JOIN memberships AS m ON m.audience_id = 1 "
    "AND m.destination = 'segment' AND m.id_kind = 'user' AND m.member_id = j.key "
    "AND m.version = 1"
)


BATCH_ARRAY = (
    "INSERT INTO delivery_batches (batch_id, audience_id, destination, message_type, outcome, "
    "sent_at, acknowledged_at, messages) VALUES (?, 1, 'segment', 'identify', 'acknowledged', "
    "?, ?, ?)"
)


def planned_state(folder: Path, members: int) -> tuple[Path, str]:
    """A state DB whose ``members`` rows are all pending (the benchmark's audience), and the
    ledger's own ``INSERT … SELECT`` of an acknowledged group's rows on it."""
    env = Env(folder, "sqlite", members, 0.0, "http://127.0.0.1:9")
    path = folder / "planned.db"
    with env.syncer(f"sqlite:///{path}", env.base) as (syncer, audience):
        syncer.sync(audience, RunOptions(deliver=False))
        log = Ledger(syncer.engine, 1, "segment", max_attempts=1)._log_acked
    assert log is not None
    return path, log


def measure(
    planned: Path,
    batches: list[tuple[str, str]],
    per_batch: Callable[[sqlite3.Connection, str, str], None],
    per_page: Callable[[sqlite3.Connection], None] | None,
) -> float:
    """Seconds to write every batch's acknowledgement on a fresh copy of ``planned``."""
    copy = planned.with_name(f"copy-{uuid.uuid4().hex[:8]}.db")
    shutil.copy(planned, copy)
    db = sqlite3.connect(copy, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(BATCH_TABLE)
    start = time.perf_counter()
    for first in range(0, len(batches), GROUP):
        db.execute("BEGIN IMMEDIATE")
        for members, ids in batches[first : first + GROUP]:
            per_batch(db, members, ids)
        db.execute("COMMIT")
        if per_page is not None and ((first + GROUP) * BATCH) % PAGE == 0:
            db.execute("BEGIN IMMEDIATE")
            per_page(db)
            db.execute("COMMIT")
    if per_page is not None:
        db.execute("BEGIN IMMEDIATE")
        per_page(db)
        db.execute("COMMIT")
    seconds = time.perf_counter() - start
    (acked,) = db.execute("SELECT count(*) FROM memberships WHERE status = 'in_sync'").fetchone()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    assert acked == len(batches) * BATCH, acked
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    members = (args.members // BATCH) * BATCH
    with tempfile.TemporaryDirectory() as folder:
        planned, log_sql = planned_state(Path(folder), members)
        names = [f"user_{i:08d}" for i in range(members)]
        batches = []
        arrays: dict[str, str] = {}
        built = 0.0
        for first in range(0, members, BATCH):
            chunk = names[first : first + BATCH]
            ids = {m: f"as-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}-v1" for m in chunk}
            batches.append((json.dumps(chunk), json.dumps(ids)))
            start = time.perf_counter()
            arrays[batches[-1][1]] = json.dumps(
                [[m, i, "true", f'{{"email":"{m}@example.com"}}', 1] for m, i in ids.items()]
            )
            built += time.perf_counter() - start
        folded = [0]

        def ack(db: sqlite3.Connection, members: str, ids: str) -> None:
            db.execute(ACK, (NOW, members))

        def log(db: sqlite3.Connection, members: str, ids: str) -> None:
            where = (1, "segment", "user", 1)  # audience, destination, id kind, version
            db.execute(log_sql, ("identify", "batch", NOW, NOW, ids, *where))

        def ack_and_log(db: sqlite3.Connection, members: str, ids: str) -> None:
            ack(db, members, ids)
            log(db, members, ids)

        def ack_and_batch_row(db: sqlite3.Connection, members: str, ids: str) -> None:
            ack(db, members, ids)
            db.execute(BATCH_ROW, ("batch", NOW, NOW, ids))

        def ack_and_array(db: sqlite3.Connection, members: str, ids: str) -> None:
            ack(db, members, ids)
            db.execute(BATCH_ARRAY, ("batch", NOW, NOW, arrays[ids]))

        def fold(db: sqlite3.Connection) -> None:
            db.execute(FOLD, (folded[0],))
            folded[0] = db.execute("SELECT max(id) FROM deliveries").fetchone()[0] or 0

        variants: dict[str, tuple[Any, Any]] = {
            "ack": (ack, None),
            "ack + ledger": (ack_and_log, None),
            "ledger, folded per page": (log, fold),
            "ack + one row per batch": (ack_and_batch_row, None),
            "ack + batch row from Python": (ack_and_array, None),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved, so that drift hits every variant alike
            for name, (per_batch, per_page) in variants.items():
                folded[0] = 0
                times[name].append(measure(planned, batches, per_batch, per_page))
    print(f"SQLite writer time for {members:,} acknowledgements, median of {args.repeat}:")
    base = statistics.median(times["ack"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:28s} {median:6.2f} s  ({median / base - 1:+.0%} of ack alone)")
    print(f"  (building the batch rows' arrays in Python: {built:.2f} s, outside the lock)")


if __name__ == "__main__":
    main()
