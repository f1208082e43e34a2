"""audience-sync benchmarks: our phases, the machine's floor and Segment's Python library.

    uv run python benchmarks/run.py [--members N] [--churn 0.01] [--state sqlite|postgres]
                                    [--repeat 3] [--skip-peer] [--memory 100000,1000000]
                                    [--json benchmarks/results.json]

Prints one table (median, min and max of the repetitions) and writes the same as JSON. The
PostgreSQL state DB comes from AUDIENCE_SYNC_BENCH_POSTGRES_URL (default: the local test
database); each repetition gets a fresh schema.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text, update

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import logging

from benchmarks.receiver import WRITE_KEY

logging.getLogger("segment").setLevel(logging.CRITICAL)  # its queue-full warnings, per message
from sync.config import parse_config
from sync.engine import Syncer
from sync.reports import RunOptions
from sync.state.tables import MEMBERSHIPS
from sync.tuning import settle_heap

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 500  # messages per request for us, the floor and the tuned peer


# --- fixtures ---------------------------------------------------------------------------------


def member_id(i: int) -> str:
    return f"user_{i:08d}"


def make_warehouse(path: Path, members: int, churn: float = 0.0) -> None:
    """members rows; with churn, the first churn*N leave and churn*N new ones enter."""
    moved = int(members * churn)
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE members (user_id TEXT NOT NULL, email TEXT)")
        ids = range(moved, members + moved)
        db.executemany(
            "INSERT INTO members VALUES (?, ?)",
            ((member_id(i), f"{member_id(i)}@example.com") for i in ids),
        )
    db.close()


# A trait group's rows change between its two snapshots for this share of the users.
TRAIT_CHANGE = 0.05


def make_trait_warehouse(path: Path, members: int, changed: float = 0.0) -> None:
    """One row of values per user; with ``changed``, that share of the rows has new values."""
    every = round(1 / changed) if changed else 0
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(
            "CREATE TABLE scores (user_id TEXT NOT NULL, orders_count INTEGER, revenue REAL, "
            "plan TEXT, last_order_at TEXT)"
        )
        db.executemany(
            "INSERT INTO scores VALUES (?, ?, ?, ?, ?)",
            (
                (
                    member_id(i),
                    i % 17 + (1 if every and i % every == 0 else 0),
                    round(i % 1000 * 1.37, 2),
                    ("free", "pro", "team")[i % 3],
                    f"2026-11-{i % 28 + 1:02d}T10:00:00Z",
                )
                for i in range(members)
            ),
        )
    db.close()


@contextmanager
def state_database(kind: str, folder: Path) -> Iterator[str]:
    """A fresh, empty state database URL."""
    if kind == "sqlite":
        path = folder / f"state-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    base = os.environ.get("AUDIENCE_SYNC_BENCH_POSTGRES_URL", DEFAULT_PG)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# Whether runs append to the delivery ledger (`--ledger`; `both` alternates it per repetition).
LEDGER = [True]


def config_text(state_url: str, warehouse: Path, receiver_url: str) -> str:
    return f"""
[state]
url = "{state_url}"
auto_upgrade = true
delivery_ledger = {"true" if LEDGER[0] else "false"}
[sources.warehouse]
url = "sqlite:///{warehouse}"
chunk_size = 20000
[destinations.segment]
type = "segment"
write_key = "{WRITE_KEY}"
endpoint = "{receiver_url}"
batch_size = {BATCH}
concurrency = 4
[[audiences]]
name = "Bench Audience"
source = "warehouse"
query = "SELECT user_id, email FROM members"
traits = ["email"]
destinations = ["segment"]
"""


def trait_config_text(state_url: str, warehouse: Path, receiver_url: str) -> str:
    """The benchmark's config with a trait group of four traits instead of the audience."""
    head = config_text(state_url, warehouse, receiver_url).split("[[audiences]]")[0]
    return head + """
[[traits]]
name = "Bench Traits"
source = "warehouse"
query = "SELECT user_id, orders_count, revenue, plan, last_order_at FROM scores"
destinations = ["segment"]
"""


@contextmanager
def receiver(latency_ms: float = 0.0) -> Iterator[str]:
    """The benchmark receiver in its own process, answering each request after
    ``latency_ms`` (a remote API's round trip; 0: at once)."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "receiver.py"), "0", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def receiver_stats(url: str) -> dict[str, int]:
    return dict(httpx.get(f"{url}/stats").json())


def receiver_reset(url: str) -> None:
    httpx.post(f"{url}/reset")


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Env:
    folder: Path
    state: str
    members: int
    churn: float
    receiver_url: str
    base: Path = field(init=False)
    churned: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base = self.folder / "warehouse.db"
        self.churned = self.folder / "warehouse-churned.db"
        make_warehouse(self.base, self.members)
        make_warehouse(self.churned, self.members, self.churn)

    @contextmanager
    def syncer(
        self, state_url: str, warehouse: Path, *, traits: bool = False
    ) -> Iterator[tuple[Syncer, Any]]:
        """A Syncer on an upgraded state DB (``auto_upgrade``), reading ``warehouse``; its
        engine is disposed afterwards. With ``traits``, on the trait group's config."""
        text_of = trait_config_text if traits else config_text
        config = parse_config(
            text_of(state_url, warehouse, self.receiver_url), "bench", self.folder, {}
        )
        with Syncer(config) as syncer:
            settle_heap()  # as the `sync` and `run` commands do once they are set up
            yield syncer, config.computations[0]

    def trait_warehouses(self) -> tuple[Path, Path]:
        """The trait group's two snapshots (made on first use)."""
        base, changed = self.folder / "traits.db", self.folder / "traits-changed.db"
        if not changed.exists():
            make_trait_warehouse(base, self.members)
            make_trait_warehouse(changed, self.members, TRAIT_CHANGE)
        return base, changed


def plan_first(env: Env) -> float:
    with state_database(env.state, env.folder) as url, env.syncer(url, env.base) as (syncer, aud):
        report = syncer.sync(aud, RunOptions(deliver=False))
    assert report.members == env.members, report
    return report.seconds


def plan_delta(env: Env) -> float:
    with state_database(env.state, env.folder) as url:
        with env.syncer(url, env.base) as (syncer, audience):
            syncer.sync(audience, RunOptions(deliver=False))
            with syncer.engine.begin() as connection:  # as if everything had been delivered
                connection.execute(
                    update(MEMBERSHIPS).values(synced_value=MEMBERSHIPS.c.value, status="in_sync")
                )
        with env.syncer(url, env.churned) as (syncer, audience):
            report = syncer.sync(audience, RunOptions(deliver=False))
    moved = int(env.members * env.churn)
    assert report.destinations[0].added == moved == report.destinations[0].removed, report
    return report.seconds


def trait_first(env: Env) -> float:
    """A trait group's first sync, computed and planned (every row pending)."""
    base, _ = env.trait_warehouses()
    with (
        state_database(env.state, env.folder) as url,
        env.syncer(url, base, traits=True) as (syncer, group),
    ):
        report = syncer.sync(group, RunOptions(deliver=False))
    assert report.members == env.members and report.destinations[0].added == env.members, report
    return report.seconds


def trait_delta(env: Env) -> float:
    """A trait group's next sync after 5% of the rows changed values, computed and planned."""
    base, changed = env.trait_warehouses()
    with state_database(env.state, env.folder) as url:
        with env.syncer(url, base, traits=True) as (syncer, group):
            syncer.sync(group, RunOptions(deliver=False))
            with syncer.engine.begin() as connection:  # as if everything had been delivered
                connection.execute(
                    update(MEMBERSHIPS).values(synced_value=MEMBERSHIPS.c.value, status="in_sync")
                )
        with env.syncer(url, changed, traits=True) as (syncer, group):
            report = syncer.sync(group, RunOptions(deliver=False))
    expected = len(range(0, env.members, round(1 / TRAIT_CHANGE)))
    assert report.destinations[0].changed == expected == report.destinations[0].pending, report
    return report.seconds


def deliver(env: Env) -> float:
    with state_database(env.state, env.folder) as url:
        with env.syncer(url, env.base) as (syncer, audience):
            syncer.sync(audience, RunOptions(deliver=False))
            receiver_reset(env.receiver_url)
            report = syncer.sync(audience)
        stats = receiver_stats(env.receiver_url)
        assert report.status == "succeeded", report
        assert stats["distinct"] == env.members and stats["invalid"] == 0, stats
        # The run re-plans (no changes) before delivering: report delivery alone.
        return _deliver_seconds(url)


def _deliver_seconds(url: str) -> float:
    engine = create_engine(url)
    with engine.connect() as connection:
        value = connection.execute(text("SELECT max(deliver_seconds) FROM runs")).scalar()
    engine.dispose()
    return float(value)


def end_to_end(env: Env) -> float:
    with state_database(env.state, env.folder) as url, env.syncer(url, env.base) as (syncer, aud):
        receiver_reset(env.receiver_url)
        report = syncer.sync(aud)
    assert report.status == "succeeded", report
    assert receiver_stats(env.receiver_url)["distinct"] == env.members
    return report.seconds


def floor_load_diff(env: Env) -> float:
    """Bare SQL: load the ids of both snapshots, then diff them with anti-joins."""
    with state_database(env.state, env.folder) as url:
        engine = create_engine(url)
        started = time.perf_counter()
        with sqlite3.connect(env.base) as base, sqlite3.connect(env.churned) as churned:
            old = [r[0] for r in base.execute("SELECT user_id FROM members")]
            new = [r[0] for r in churned.execute("SELECT user_id FROM members")]
        with engine.begin() as connection:
            for table, ids in (("old_ids", old), ("new_ids", new)):
                connection.execute(text(f"CREATE TABLE {table} (id TEXT PRIMARY KEY)"))
                if engine.dialect.name == "postgresql":
                    raw = connection.connection.dbapi_connection
                    with (
                        raw.cursor() as cursor,
                        cursor.copy(f"COPY {table} (id) FROM STDIN") as copy,
                    ):
                        for value in ids:
                            copy.write_row((value,))
                else:
                    connection.exec_driver_sql(
                        f"INSERT INTO {table} VALUES (?)", [(i,) for i in ids]
                    )
            if engine.dialect.name == "postgresql":
                connection.execute(text("ANALYZE old_ids"))
                connection.execute(text("ANALYZE new_ids"))
            gone = connection.execute(
                text(
                    "SELECT count(*) FROM old_ids o WHERE NOT EXISTS (SELECT 1 FROM new_ids n WHERE n.id = o.id)"
                )
            ).scalar()
            came = connection.execute(
                text(
                    "SELECT count(*) FROM new_ids n WHERE NOT EXISTS (SELECT 1 FROM old_ids o WHERE o.id = n.id)"
                )
            ).scalar()
        seconds = time.perf_counter() - started
        assert gone == came == int(env.members * env.churn)
        engine.dispose()
        return seconds


def _identify(i: int) -> dict[str, Any]:
    user = member_id(i)
    return {
        "type": "identify",
        "userId": user,
        "messageId": f"floor-{i}",
        "timestamp": "2026-11-28T00:00:00.000Z",
        "traits": {"email": f"{user}@example.com", "bench_audience": True},
        "context": {"library": {"name": "floor", "version": "0"}},
    }


def _body(env: Env, start: int) -> bytes:
    batch = [_identify(i) for i in range(start, min(start + BATCH, env.members))]
    return json.dumps({"batch": batch, "sentAt": "2026-11-28T00:00:00.000Z"}).encode()


def _post_all(env: Env, bodies: Iterable[Any], make: Callable[[Any], bytes]) -> float:
    """POST make(item) for every item, four in flight; seconds until all were answered."""
    receiver_reset(env.receiver_url)
    started = time.perf_counter()
    with httpx.Client(auth=(WRITE_KEY, ""), limits=httpx.Limits(max_connections=4)) as client:

        def post(item: Any) -> None:
            client.post(
                f"{env.receiver_url}/v1/batch",
                content=make(item),
                headers={"Content-Type": "application/json"},
            ).raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(post, bodies))
    seconds = time.perf_counter() - started
    assert receiver_stats(env.receiver_url)["distinct"] == env.members
    return seconds


def floor_send(env: Env) -> float:
    """Bare httpx + JSON: the same batches, four in flight, no state."""
    return _post_all(env, range(0, env.members, BATCH), lambda start: _body(env, start))


def receiver_alone(env: Env) -> float:
    """The receiver's own capacity: the same batches, encoded before the clock starts."""
    bodies = [_body(env, start) for start in range(0, env.members, BATCH)]
    return _post_all(env, bodies, lambda body: body)


def _peer(env: Env, **settings: Any) -> tuple[float, int]:
    from segment.analytics.client import Client

    receiver_reset(env.receiver_url)
    client = Client(WRITE_KEY, host=env.receiver_url, **settings)
    dropped = 0
    started = time.perf_counter()
    for i in range(env.members):
        user = member_id(i)
        ok, _ = client.identify(user, {"email": f"{user}@example.com", "bench_audience": True})
        dropped += not ok
    client.shutdown()
    seconds = time.perf_counter() - started
    received = receiver_stats(env.receiver_url)["distinct"]
    assert received + dropped == env.members, (received, dropped)
    return seconds, dropped


PEER_TUNED = {"max_queue_size": 10**9, "upload_size": 500, "thread": 4, "upload_interval": 0.05}


def peer_default(env: Env) -> float:
    seconds, dropped = _peer(env)
    env.__dict__["peer_default_dropped"] = dropped
    return seconds


def peer_tuned(env: Env) -> float:
    seconds, dropped = _peer(env, **PEER_TUNED)
    assert dropped == 0
    return seconds


SCENARIOS: dict[str, Callable[[Env], float]] = {
    "floor-load-diff": floor_load_diff,
    "floor-send": floor_send,
    "receiver": receiver_alone,
    "plan-first": plan_first,
    "plan-delta": plan_delta,
    "deliver": deliver,
    "end-to-end": end_to_end,
    "trait-first": trait_first,
    "trait-delta": trait_delta,
    "peer-default": peer_default,
    "peer-tuned": peer_tuned,
}


# --- memory ---------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(phase: str, members: int, state: str, receiver_url: str) -> None:
    """Run one phase in this (child) process and print its peak RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp), state, members, 0.0, receiver_url)
        baseline = _peak_rss_mb()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure the phase alone
        (plan_first if phase == "plan" else deliver)(env)
        peak = _peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "baseline_mb": baseline}))


def measure_memory(sizes: list[int], state: str, receiver_url: str) -> list[dict[str, Any]]:
    rows = []
    for members in sizes:
        for phase in ("plan", "deliver"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-memory",
                    phase,
                    "--members",
                    str(members),
                    "--state",
                    state,
                    "--receiver",
                    receiver_url,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(
                {
                    "phase": phase,
                    "members": members,
                    **json.loads(out.stdout.strip().splitlines()[-1]),
                }
            )
    return rows


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--state", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--memory", default="", help="comma-separated sizes for peak RSS")
    parser.add_argument("--json", default=str(HERE / "results.json"))
    parser.add_argument(
        "--ledger",
        choices=["on", "off", "both"],
        default="on",
        help="[state] delivery_ledger; both: each scenario with it off and on, alternately",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="receiver's answer delay per request, ms"
    )
    parser.add_argument("--child-memory", choices=["plan", "deliver"], help=argparse.SUPPRESS)
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    state = "postgresql" if args.state == "postgres" else "sqlite"
    if args.child_memory:
        return child_memory(args.child_memory, args.members, state, args.receiver)

    names = [n for n in args.scenarios.split(",") if n]
    if args.skip_peer:
        names = [n for n in names if not n.startswith("peer")]
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "python": platform.python_version(),
        "state": state,
        "members": args.members,
        "churn": args.churn,
        "repeat": args.repeat,
        "ledger": args.ledger,
        "latency_ms": args.latency,
        "scenarios": {},
    }
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.ledger]
    with tempfile.TemporaryDirectory() as tmp, receiver(args.latency) as url:
        env = Env(Path(tmp), state, args.members, args.churn, url)
        for name in names:
            times: dict[bool, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.repeat):
                for mode in modes:  # alternated, so that drift in the machine's load is shared
                    LEDGER[0] = mode
                    times[mode].append(SCENARIOS[name](env))
            for mode in modes:
                label = name if mode or args.ledger == "off" else f"{name} (no ledger)"
                median = statistics.median(times[mode])
                results["scenarios"][label] = {
                    "median": median,
                    "min": min(times[mode]),
                    "max": max(times[mode]),
                    "per_second": args.members / median,
                }
                print(f"  {label}: {median:.2f}s", file=sys.stderr, flush=True)
            if len(modes) == 2:
                off, on = (statistics.median(times[mode]) for mode in modes)
                results["scenarios"][name]["ledger_cost"] = on / off - 1
                print(f"  {name}: ledger costs {on / off - 1:+.0%}", file=sys.stderr, flush=True)
        if "peer_default_dropped" in env.__dict__:
            results["peer_default_dropped"] = env.__dict__["peer_default_dropped"]
            results["peer_tuned_settings"] = PEER_TUNED
        if args.memory:
            sizes = [int(s) for s in args.memory.split(",")]
            results["memory"] = measure_memory(sizes, state, url)
    print_table(results)
    Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, Any]) -> None:
    s = results["scenarios"]

    def ratio(a: str, b: str, invert: bool = False) -> str:
        if a not in s or b not in s:
            return ""
        value = s[b]["median"] / s[a]["median"] if invert else s[a]["median"] / s[b]["median"]
        return f"{value:.2f}x"

    notes = {
        "receiver": "pre-encoded bodies: the receiver's own capacity",
        "plan-first": f"{ratio('plan-first', 'floor-load-diff')} of floor load+diff (target <= 3.0x)",
        "plan-delta": f"{ratio('plan-delta', 'floor-load-diff')} of floor load+diff (target <= 2.0x)",
        "deliver": f"{ratio('deliver', 'floor-send', invert=True)} of bare httpx rate (target >= 0.5x); "
        f"{ratio('deliver', 'peer-tuned', invert=True)} of tuned peer rate (target >= 5x)",
        "end-to-end": f"{ratio('end-to-end', 'peer-tuned', invert=True)} faster than tuned peer (target >= 5x)",
        "trait-first": "a trait group of 4 traits: compute + plan, every row pending",
        "trait-delta": f"{TRAIT_CHANGE:.0%} of the rows changed values: compute + plan",
        "peer-default": f"dropped {results.get('peer_default_dropped', '?')} messages",
        "peer-tuned": f"settings {results.get('peer_tuned_settings', '')}",
    }
    print(
        f"audience-sync benchmark — {results['date']} — {results['machine']} — Python {results['python']}"
    )
    print(
        f"state DB: {results['state']}, members: {results['members']:,}, churn: {results['churn']}, repetitions: {results['repeat']}"
    )
    print(
        f"delivery ledger: {results.get('ledger', 'on')}, receiver latency: {results.get('latency_ms', 0):g} ms"
    )
    print(f"{'scenario':<16} {'median s':>9} {'min s':>8} {'max s':>8} {'members/s':>11}  notes")
    for name, row in s.items():
        note = notes.get(name, "")
        if "ledger_cost" in row:
            note = f"ledger costs {row['ledger_cost']:+.0%} of the time without; {note}"
        print(
            f"{name:<16} {row['median']:>9.2f} {row['min']:>8.2f} {row['max']:>8.2f} {row['per_second']:>11,.0f}  {note}"
        )
    for row in results.get("memory", []):
        print(
            f"memory {row['phase']:<8} {row['members']:>10,} members: peak RSS {row['peak_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
