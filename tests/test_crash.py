"""SIGKILL a real `audience-sync sync` at several points over 50,000 members, then converge."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import Engine, func, select, text

from sync.state.tables import MEMBERSHIPS, RUNS, STAGED
from tests.harness import Harness
from tests.processes import spawn, wait_for
from tests.receiver import Receiver

KEY = "high_value_users"
MEMBERS = 50_000


# A trait group over the same members: each one's e-mail as the trait `contact`.
TRAITS = """
[[traits]]
name = "Contacts"
source = "warehouse"
query = "SELECT user_id, email AS contact FROM members"
destinations = ["segment"]
"""


def fill(harness: Harness, ids: range | list[int], domain: str = "x.co") -> set[str]:
    members = [f"u{i:06d}" for i in ids]
    with sqlite3.connect(harness.warehouse) as db:
        db.execute("DELETE FROM members")
        db.executemany(
            "INSERT INTO members VALUES (?, ?, NULL)", ((m, f"{m}@{domain}") for m in members)
        )
    db.close()
    return set(members)


def scalar(engine: Engine, query) -> int:
    with engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0)


def kill_when(process: subprocess.Popen[bytes], condition, what: str) -> None:
    wait_for(condition, 60, what)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_sigkill_at_every_phase_then_converge(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.destinations["segment"].update(batch_size=500, concurrency=2)
    harness.config_extra = '\n[daemon]\nlease_seconds = "5s"\n' + TRAITS
    config = harness.write_config()
    config.write_text(config.read_text().replace("chunk_size = 1000", "chunk_size = 500"))
    engine = harness.engine
    command = ["sync", "--wait", "30"]

    # 1. During staging.
    fill(harness, range(MEMBERS))
    victim = spawn(config, *command, log=tmp_path / "1.log")
    kill_when(
        victim, lambda: scalar(engine, select(func.count()).select_from(STAGED)) > 0, "staging"
    )
    assert scalar(engine, select(func.count()).select_from(MEMBERSHIPS)) == 0

    # 2. As soon as the second run's compute has committed: planning.
    computed = select(func.count()).where(RUNS.c.id >= 2, RUNS.c.compute_seconds.is_not(None))
    victim = spawn(config, *command, log=tmp_path / "2.log")
    kill_when(victim, lambda: scalar(engine, computed) >= 1, "planning")

    # 3. Mid-delivery, against a slow receiver; the snapshot changes before the restart.
    receiver.delay = 0.05
    victim = spawn(config, *command, log=tmp_path / "3.log")
    kill_when(victim, lambda: len(receiver.requests) >= 8, "delivery")
    program = victim.args[: -len(command)]

    # 4. The trait group mid-delivery (its first sync), values changed before the restart.
    def contacts_sent() -> int:
        return sum(1 for (_, key) in list(receiver.state) if key == "contact")

    victim = spawn(config, "sync", "Contacts", "--wait", "30", log=tmp_path / "4.log")
    kill_when(victim, lambda: contacts_sent() >= 1_000, "trait group delivery")
    receiver.delay = 0
    last = fill(harness, range(1_000, MEMBERS + 500), domain="y.co")

    # Restart: waits out the dead process's lease, then converges.
    final = subprocess.run(
        [*program, "sync", "--wait", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stdout + final.stderr
    state = {who: value for (who, key), value in receiver.state.items() if key == KEY}
    assert {who for who, value in state.items() if value} == last
    assert set(state) <= {f"u{i:06d}" for i in range(MEMBERS + 500)}
    # The trait group: members hold their current e-mail, leavers null.
    contacts = {who: value for (who, key), value in receiver.state.items() if key == "contact"}
    assert {who: v for who, v in contacts.items() if v is not None} == {
        m: f"{m}@y.co" for m in last
    }
    assert set(contacts) <= {f"u{i:06d}" for i in range(MEMBERS + 500)}

    with engine.connect() as connection:
        statuses = connection.execute(select(RUNS.c.status).order_by(RUNS.c.id)).scalars().all()
        assert "running" not in statuses and statuses[-1] == "succeeded"
        assert statuses.count("abandoned") == 4  # one per kill
        assert connection.execute(select(func.count()).select_from(STAGED)).scalar() == 0
        pending = connection.execute(
            select(func.count()).where(MEMBERSHIPS.c.status.in_(("pending", "rejected")))
        ).scalar()
        assert pending == 0
        # Every row agrees with itself: delivered rows hold what they should.
        inconsistent = connection.execute(
            select(func.count()).where(
                MEMBERSHIPS.c.status == "in_sync",
                MEMBERSHIPS.c.in_doubt.is_(True)
                | (MEMBERSHIPS.c.synced_value.is_distinct_from(MEMBERSHIPS.c.value)),
            )
        ).scalar()
        assert inconsistent == 0
        if engine.dialect.name == "sqlite":
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
        else:
            orphans = connection.execute(
                text(
                    "SELECT count(*) FROM memberships m LEFT JOIN audiences a ON a.id = m.audience_id WHERE a.id IS NULL"
                )
            ).scalar()
            assert orphans == 0
