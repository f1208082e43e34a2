"""A value the driver cannot convert makes its row invalid, not the run (issue #10, finding 11):
text that is not UTF-8 in SQLite, dates out of Python's range (``infinity``) in PostgreSQL."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine, text

from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"


def _not_utf8(db: sqlite3.Connection, user_id: str | bytes, email: str | bytes) -> None:
    """Insert a row whose bytes values are stored as TEXT (SQLite stores what it is given)."""
    db.execute(
        "INSERT INTO members VALUES (CAST(? AS TEXT), CAST(? AS TEXT), NULL)", (user_id, email)
    )


def test_text_that_is_not_utf8_makes_its_row_invalid(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members([("ok-1", "a@x.co")])
    with sqlite3.connect(harness.warehouse) as db:
        _not_utf8(db, "bad-trait", b"caf\xe9@x.co")
        _not_utf8(db, b"bad-\xff-id", "c@x.co")
        db.execute("INSERT INTO members VALUES ('ok-2', 'b@x.co', NULL)")
    db.close()
    harness.destinations["segment"]["batch_size"] = 1
    report = harness.sync()
    assert report.status == "succeeded", report.error
    assert (report.members, report.invalid) == (2, 2)
    samples = " | ".join(report.invalid_samples)
    assert "row 2: trait email of user_id 'bad-trait': not valid UTF-8" in samples
    assert "row 3: user_id: id 'bad-\\udcff-id' is not valid UTF-8" in samples
    assert sorted(m["userId"] for m in receiver.messages()) == ["ok-1", "ok-2"]
    assert harness.runs()[-1].invalid == 2


def test_not_utf8_on_the_same_database_path(harness: Harness, receiver: Receiver) -> None:
    if harness.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses text that is not valid in its encoding")
    with harness.engine.begin() as connection:
        connection.execute(text("CREATE TABLE people (user_id TEXT, email TEXT)"))
        connection.execute(
            text(
                "INSERT INTO people VALUES ('ok', 'a@x.co'), "
                "('bad', CAST(x'ff' AS TEXT)), (CAST(x'c3' AS TEXT), 'b@x.co')"
            )
        )
    harness.source_url = harness.engine.url.render_as_string(hide_password=False)
    harness.audience["query"] = "SELECT user_id, email FROM people"
    report = harness.sync()
    assert report.status == "succeeded", report.error
    assert (report.members, report.invalid) == (1, 2)
    assert [m["userId"] for m in receiver.messages()] == ["ok"]


def test_dates_out_of_range_make_their_rows_invalid(
    harness: Harness, receiver: Receiver, postgres_schema_url: str
) -> None:
    source = create_engine(postgres_schema_url)
    try:
        with source.begin() as connection:
            connection.execute(
                text(
                    "CREATE TABLE events "
                    "(user_id TEXT, email TEXT, seen DATE, at TIMESTAMPTZ, unused DATE)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO events VALUES "
                    "('p1', 'p1@x.co', '2026-01-02', '2026-01-02 10:00+00', NULL), "
                    "('p2', 'p2@x.co', 'infinity', '2026-01-02 10:00+00', NULL), "
                    "('p3', 'p3@x.co', '2026-01-02', '-infinity', NULL), "
                    "('p4', 'p4@x.co', NULL, NULL, 'infinity')"
                )
            )
    finally:
        source.dispose()
    harness.source_url = postgres_schema_url
    harness.audience["query"] = "SELECT user_id, email, seen, at, unused FROM events"
    harness.audience["traits"] = ["email", "seen", "at"]
    report = harness.sync()
    assert report.status == "succeeded", report.error
    assert (report.members, report.invalid) == (2, 2)
    samples = " | ".join(report.invalid_samples)
    assert "trait seen of user_id 'p2': cannot be converted" in samples
    assert "'infinity'" in samples
    assert "trait at of user_id 'p3': cannot be converted" in samples
    # A column that is neither an id nor a trait (unused) does not make its row invalid.
    by_user = {m["userId"]: m["traits"] for m in receiver.messages()}
    assert by_user["p1"]["seen"] == "2026-01-02"
    assert set(by_user) == {"p1", "p4"}
