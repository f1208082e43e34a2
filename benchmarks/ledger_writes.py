"""What the delivery ledger costs the SQLite state DB's one writer.

    uv run python benchmarks/ledger_writes.py [--members 100000] [--repeat 3]

A state DB is planned once (every row pending), then copied for each variant, which writes the
acknowledgements of all its rows in batches of 500, four batches per transaction (as grouped
commits do), with the statements ``sync/delivery/ledger.py`` issues:

- ``ack``: the compare-and-set UPDATE of each batch (the ledger off; ``Ledger._ack`` as it
  compiles on SQLite, with its constants inlined);
- ``ack + ledger``: that and the batch's ``delivery_batches`` row (the ledger on: ``Ledger``'s
  own INSERT, its messages built by ``ledger_messages`` — outside the write lock, as
  ``Ledger.record`` does; that Python time is printed apart).

Writer time only: no HTTP, no encoding. Prints the median seconds of each variant. (Earlier
variants — a row per message, a fold of the ledger into ``memberships`` per page, arrays built
by SQL — are measured in README "Delivery ledger" → Cost, with the commits that had them.)
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
from sync.delivery.batches import Unit
from sync.delivery.ledger import Ledger, ledger_messages
from sync.reports import RunOptions

BATCH = 500
GROUP = 4  # batches per transaction
MID = "as-0123456789012345678901234567890123456789-v1"  # as the encoder hands it (Unit.ids)
IDENTIFY = f'{{"type":"identify","messageId":"{MID}"}}'
NOW = "2026-11-29 20:00:00.000000"
WHERE = "audience_id = 1 AND destination = 'segment' AND id_kind = 'user'"
ACK = (
    "UPDATE memberships SET synced_value = value, in_doubt = 0, status = 'in_sync', "
    "attempts = 0, next_attempt_at = NULL, last_error = NULL, delivered_at = ? "
    f"WHERE {WHERE} AND member_id IN (SELECT value FROM json_each(?)) AND version = 1"
)


def planned_state(folder: Path, members: int) -> tuple[Path, str]:
    """A state DB whose ``members`` rows are all pending (the benchmark's audience), and the
    ledger's own INSERT of a ``delivery_batches`` row on it."""
    env = Env(folder, "sqlite", members, 0.0, "http://127.0.0.1:9")
    path = folder / "planned.db"
    with env.syncer(f"sqlite:///{path}", env.base) as (syncer, audience):
        syncer.sync(audience, RunOptions(deliver=False))
        log = Ledger(syncer.engine, 1, "segment", max_attempts=1)._log_sql
    return path, log


def measure(
    planned: Path,
    batches: list[tuple[str, str]],
    per_batch: Callable[[sqlite3.Connection, str, str], None],
) -> float:
    """Seconds to write every batch's acknowledgement on a fresh copy of ``planned``."""
    copy = planned.with_name(f"copy-{uuid.uuid4().hex[:8]}.db")
    shutil.copy(planned, copy)
    db = sqlite3.connect(copy, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    start = time.perf_counter()
    for first in range(0, len(batches), GROUP):
        db.execute("BEGIN IMMEDIATE")
        for members, ids in batches[first : first + GROUP]:
            per_batch(db, members, ids)
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
        rows: dict[str, tuple[Any, ...]] = {}
        built = 0.0
        for first in range(0, members, BATCH):
            chunk = names[first : first + BATCH]
            units = [
                Unit("user", m, 1, False, [IDENTIFY], 0, "true", f'{{"email":"{m}@x.com"}}', [MID])
                for m in chunk
            ]
            batches.append((json.dumps(chunk), uuid.uuid4().hex))
            start = time.perf_counter()
            ((count, text),) = ledger_messages(units)
            row = (batches[-1][1], 1, "segment", "acknowledged", None, None, NOW, NOW)
            rows[batches[-1][1]] = (*row, count, text)
            built += time.perf_counter() - start

        def ack(db: sqlite3.Connection, members: str, batch: str) -> None:
            db.execute(ACK, (NOW, members))

        def ack_and_log(db: sqlite3.Connection, members: str, batch: str) -> None:
            ack(db, members, batch)
            db.execute(log_sql, rows[batch])

        variants: dict[str, Any] = {"ack": ack, "ack + ledger": ack_and_log}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved, so that drift hits every variant alike
            for name, per_batch in variants.items():
                times[name].append(measure(planned, batches, per_batch))
    print(f"SQLite writer time for {members:,} acknowledgements, median of {args.repeat}:")
    base = statistics.median(times["ack"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:28s} {median:6.2f} s  ({median / base - 1:+.0%} of ack alone)")
    print(f"  (building the ledger rows in Python: {built:.2f} s, outside the write lock)")


if __name__ == "__main__":
    main()
