"""`sync --dry-run` never blocks a real run and never changes the state DB, and reports what the
real run then does (issue #10, finding 9)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from sync.engine import RunHooks, Syncer
from sync.reports import RunOptions, RunReport
from sync.state.db import make_state_engine
from sync.state.tables import Base
from tests.harness import Harness
from tests.receiver import Receiver

# Deadlines for the threads below (never a sleep: they only bound a wait for an event).
DEADLINE_SECONDS = 90


def in_thread(results: dict[str, Any], run: Any) -> threading.Thread:
    """Start ``run`` in a thread; its report or exception lands in ``results``."""

    def target() -> None:
        try:
            results["report"] = run()
        except BaseException as exc:
            results["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def state_dump(engine: Engine) -> dict[str, list[Any]]:
    """Every row of every state table, in primary-key order."""
    dump = {}
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            order = list(table.primary_key.columns) or list(table.columns)
            dump[table.name] = list(connection.execute(select(table).order_by(*order)).all())
    return dump


def counts(report: RunReport) -> tuple[Any, ...]:
    return (
        report.members,
        report.invalid,
        report.duplicates,
        [(d.destination, d.added, d.removed, d.pending, d.skipped) for d in report.destinations],
    )


def test_a_paused_dry_run_does_not_block_a_real_sync(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members([f"u{i:04d}" for i in range(2500)])  # chunks of 1000: three
    config = harness.config()
    audience = config.audiences[0]
    paused, resume = threading.Event(), threading.Event()

    def pause_once() -> None:
        if not paused.is_set():
            paused.set()  # the source query is open, two chunks still to read
            assert resume.wait(DEADLINE_SECONDS)

    dry: dict[str, Any] = {}
    dry_options = RunOptions(dry_run=True)
    dry_syncer = Syncer(config, harness.engine, hooks=RunHooks(after_chunk=pause_once))
    dry_thread = in_thread(dry, lambda: dry_syncer.sync(audience, dry_options))
    real: dict[str, Any] = {}
    real_thread: threading.Thread | None = None
    engine = make_state_engine(harness.engine.url.render_as_string(hide_password=False))
    try:
        assert paused.wait(DEADLINE_SECONDS)
        # A second process's `sync --wait 0` of the same audience.
        real_thread = in_thread(
            real, lambda: Syncer(config, engine).sync(audience, RunOptions(wait=0.0))
        )
        real_thread.join(DEADLINE_SECONDS)
        finished_while_paused = not real_thread.is_alive()
    finally:
        resume.set()
        dry_thread.join(DEADLINE_SECONDS)
        if real_thread is not None and real_thread.is_alive():
            real_thread.join(DEADLINE_SECONDS)
        engine.dispose()
    assert finished_while_paused, "the real sync waited for the dry run"
    assert "error" not in real, real.get("error")
    report = real["report"]
    assert report.status == "succeeded", report.error
    assert report.members == 2500 and report.destinations[0].sent == 2500
    assert len(receiver.messages()) == 2500
    assert dry["report"].status == "planned" and dry["report"].members == 2500


def _dry_then_real(harness: Harness, **options: Any) -> tuple[RunReport, RunReport]:
    before = state_dump(harness.engine)
    dry = harness.sync(dry_run=True, **options)
    assert state_dump(harness.engine) == before, "the dry run changed the state DB"
    return dry, harness.sync(**options)


def test_dry_run_on_a_new_audience_writes_nothing(harness: Harness) -> None:
    harness.set_members(["a", "b", ("c", "c@x.co", "anon-c")])
    dry, real = _dry_then_real(harness)
    assert dry.status == "planned" and real.status == "succeeded"
    assert counts(dry) == counts(real)
    assert real.run_id == 1  # the dry run took no run id either (PostgreSQL sequences)


@pytest.mark.parametrize("same_database", [False, True])
def test_dry_run_counts_are_the_real_runs(harness: Harness, same_database: bool) -> None:
    if same_database:
        with harness.engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE members (user_id TEXT, email TEXT, anonymous_id TEXT)")
            )
        harness.source_url = harness.engine.url.render_as_string(hide_password=False)
    rows: list[Any] = [f"m{i}" for i in range(10)]

    def load(members: list[Any]) -> None:
        if not same_database:
            harness.set_members(members)
            return
        with harness.engine.begin() as connection:
            connection.execute(text("DELETE FROM members"))
            for m in members:
                member = (m, f"{m}@x.co", None) if isinstance(m, str) else m
                connection.execute(
                    text("INSERT INTO members VALUES (:u, :e, :a)"),
                    {"u": member[0], "e": member[1], "a": member[2]},
                )

    harness.destinations["preview"] = {"type": "file", "path": "out.jsonl"}
    harness.destinations["wishpond"] = {
        "type": "wishpond",
        "write_key": "wk_test_secret_123",
        "endpoint": harness.receiver_url,
        "merchant_id": "m",
        "tracking_key": "t",
    }
    harness.audience["destinations"] = ["segment", "preview"]
    load(rows)
    dry, real = _dry_then_real(harness)
    assert counts(dry) == counts(real) and dry.destinations[0].added == 10
    # A delta with invalid and duplicate rows, a new destination, anonymous members.
    harness.audience["destinations"] = ["segment", "preview", "wishpond"]
    load([*rows[3:], "m3", "", "x" * 300, (None, "n@x.co", "anon-1"), "new-1"])
    dry, real = _dry_then_real(harness)
    assert counts(dry) == counts(real) and dry.destinations[0].removed == 3
    # A full resync that includes the members who left.
    dry, real = _dry_then_real(harness, full=True, include_exited=True)
    assert counts(dry) == counts(real)
    # A mass removal is guarded on both.
    harness.defaults["guard_min_members"] = 1
    load(["m9"])
    dry, real = _dry_then_real(harness)
    assert (dry.status, real.status) == ("guarded", "guarded") and dry.error == real.error
