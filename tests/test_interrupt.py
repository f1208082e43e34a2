"""Ctrl-C during `sync`: the first SIGINT lets the batches in flight finish, the second abandons
them; either way the run is recorded `interrupted` (not `failed`), what was left stays pending,
and rows the destination may hold unacknowledged are resolved by the next run."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from sync.state.db import downgrade, upgrade
from sync.state.tables import AUDIENCES, DELIVERY_PROGRESS, RUNS
from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver

KEY = "high_value_users"
MEMBERS = [f"u{i:03d}" for i in range(60)]


def _insert_run(engine: Engine, status: str) -> None:
    now = datetime.now(UTC)
    with engine.begin() as connection:
        audience_id = connection.execute(select(AUDIENCES.c.id)).scalar()
        if audience_id is None:
            audience_id = connection.execute(
                insert(AUDIENCES).values(key="k", name="k", definition_hash="h", created_at=now)
            ).inserted_primary_key[0]  # type: ignore[index]
        connection.execute(
            insert(RUNS).values(
                audience_id=audience_id,
                trigger="manual",
                status=status,
                started_at=now,
                members=0,
                added=0,
                removed=0,
                sent=0,
                rejected=0,
                invalid=0,
                duplicates=0,
                skipped=0,
            )
        )


def test_migration_0010_allows_interrupted_runs(bare_engine: Engine) -> None:
    upgrade(bare_engine, "0009")
    with pytest.raises((IntegrityError, OperationalError)):
        _insert_run(bare_engine, "interrupted")
    _insert_run(bare_engine, "failed")
    upgrade(bare_engine, "0010")
    _insert_run(bare_engine, "interrupted")
    with pytest.raises((IntegrityError, OperationalError)):
        _insert_run(bare_engine, "exploded")  # the CHECK constraint is still there
    downgrade(bare_engine, "0009")
    with bare_engine.connect() as connection:
        statuses = connection.execute(select(RUNS.c.status).order_by(RUNS.c.id)).scalars().all()
    assert statuses == ["failed", "failed"]
    upgrade(bare_engine)


def _start_held_sync(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """A `sync` subprocess whose first batch is held by the receiver (in flight)."""
    harness.destinations["segment"].update(batch_size=10, concurrency=1, timeout=60)
    harness.set_members(MEMBERS)
    config = harness.write_config()
    receiver.gate = threading.Event()
    log = tmp_path / "sync.log"
    process = spawn(config, "sync", log=log)
    wait_for(lambda: receiver.arrivals >= 1, 30, "a batch in flight")
    return process, log


def _run(engine: Engine) -> tuple[str, str | None]:
    with engine.connect() as connection:
        (row,) = connection.execute(select(RUNS.c.status, RUNS.c.error)).all()
    return row.status, row.error


def _progress_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(DELIVERY_PROGRESS)).scalar_one()
        )


def test_ctrl_c_finishes_the_batch_in_flight_and_records_interrupted(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    process, log = _start_held_sync(harness, receiver, tmp_path)
    try:
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "finishing the batches in flight" in log.read_text(), 30, "the notice")
    finally:
        assert receiver.gate is not None
        receiver.gate.set()
    code = process.wait(timeout=60)
    output = log.read_text()
    assert code == 3, output
    assert "interrupted" in output and "KeyboardInterrupt" not in output, output
    status, error = _run(harness.engine)
    assert status == "interrupted" and error and "interrupted" in error
    # The batch in flight was acknowledged; nothing else was sent; the rest stays pending.
    rows = harness.memberships()
    assert len(receiver.messages()) == 10 and receiver.arrivals == 1
    sent = {m["userId"] for m in receiver.messages()}
    for member, row in rows.items():
        if member in sent:
            assert (row.status, row.synced_value, row.in_doubt) == ("in_sync", "true", False), member
        else:
            assert (row.status, row.synced_value, row.in_doubt) == ("pending", None, False), member
    assert _progress_rows(harness.engine) == 0  # delivery ended normally

    # The next sync sends the rest, once.
    receiver.gate = None
    assert harness.sync().status == "succeeded"
    assert Counter(m["userId"] for m in receiver.messages()) == Counter(MEMBERS)


def test_a_second_ctrl_c_abandons_the_batch_in_flight(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    process, log = _start_held_sync(harness, receiver, tmp_path)
    assert receiver.gate is not None
    try:
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "finishing the batches in flight" in log.read_text(), 30, "the notice")
        process.send_signal(signal.SIGINT)
        # It exits while the receiver still holds the batch: abandoned, not awaited.
        code = process.wait(timeout=30)
    finally:
        receiver.gate.set()  # the abandoned batch arrives after all: applied, unacknowledged
    output = log.read_text()
    assert code == 3, output
    assert "abandoned" in output and "Traceback" not in output, output
    status, error = _run(harness.engine)
    assert status == "interrupted" and error and "abandoned" in error
    assert "KeyboardInterrupt" not in error
    # Nothing was acknowledged; the delivery's progress row bounds what may have arrived.
    assert all(r.synced_value is None and r.status == "pending" for r in harness.memberships().values())
    assert _progress_rows(harness.engine) == 1
    wait_for(lambda: len(receiver.messages()) == 10, 30, "the abandoned batch to be applied")
    in_flight = [m["messageId"] for m in receiver.messages()]

    # The next run marks the handed-over rows in doubt before planning, resends them with the
    # same messageIds and converges.
    receiver.gate = None
    harness.set_members(MEMBERS[5:])  # five of the abandoned batch left meanwhile
    report = harness.sync()
    assert report.status == "succeeded", report.error
    resent = {m["messageId"] for m in receiver.messages()[10:]}
    assert set(in_flight[5:]) <= resent  # still members: the same change, the same id
    values = receiver.values(KEY)
    assert {u for u, v in values.items() if v} == set(MEMBERS[5:])
    assert all(values[u] is False for u in MEMBERS[:5])  # in doubt, so told they left
    assert _progress_rows(harness.engine) == 0
