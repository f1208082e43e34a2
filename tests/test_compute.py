"""Compute: streaming, validation, read-only sources, and the same-database fast path."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import sync.run.compute
from sync.run.staging import json_value, normalize_id, traits_json
from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"


def test_invalid_rows_are_counted_and_sampled_never_fatal(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(
        [
            ("ok-1", "a@x.co"),
            (None, "null@x.co"),
            ("   ", "blank@x.co"),
            ("x" * 300, "long@x.co"),
            ("line\nbreak", "nl@x.co"),
            ("ok-1", "dup@x.co"),
            ("ok-2", "b@x.co"),
        ]
    )
    report = harness.sync()
    assert report.status == "succeeded"
    assert (report.members, report.invalid, report.duplicates) == (2, 4, 1)
    assert len(report.invalid_samples) == 4
    assert any("300 characters" in s for s in report.invalid_samples)
    assert any("NULL or blank" in s for s in report.invalid_samples)
    assert any("newline" in s for s in report.invalid_samples)
    assert sorted(m["userId"] for m in receiver.messages()) == ["ok-1", "ok-2"]
    run = harness.runs()[-1]
    assert (run.invalid, run.duplicates, run.members) == (4, 1, 2)
    assert run.invalid_samples == report.invalid_samples


def test_non_text_ids_and_traits_are_coerced(harness: Harness, receiver: Receiver) -> None:
    with sqlite3.connect(harness.warehouse) as db:
        db.execute("DROP TABLE members")
        db.execute("CREATE TABLE members (user_id, email, score, signup BLOB)")
        db.execute("INSERT INTO members VALUES (42, 'a@x.co', 1.5, X'68656c6c6f')")
        db.execute("INSERT INTO members VALUES (7.0, 'b@x.co', NULL, X'ff00')")
    harness.audience["query"] = "SELECT user_id, email, score, signup FROM members"
    harness.audience["traits"] = ["email", "score", "signup"]
    harness.sync()
    by_user = {m["userId"]: m["traits"] for m in receiver.messages()}
    assert by_user["42"] == {"email": "a@x.co", "score": 1.5, "signup": "hello", KEY: True}
    assert by_user["7"]["signup"] == "/wA="


def test_json_value_and_normalize_id() -> None:
    import datetime as dt

    assert json_value(Decimal("10.00")) == 10
    assert json_value(Decimal("10.25")) == 10.25
    assert json_value(dt.date(2026, 1, 2)) == "2026-01-02"
    assert json_value(float("nan")) is None
    assert normalize_id(True)[1] is not None
    assert normalize_id(12) == ("12", None)
    assert normalize_id(float("inf"))[1] is not None
    assert normalize_id("") == (None, None)


_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.decimals(allow_nan=True)
    | st.dates()
    | st.binary(max_size=4)
    | st.lists(st.integers() | st.text(max_size=3), max_size=3)
)


@settings(max_examples=300, derandomize=True)
@given(names=st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=4), data=st.data())
def test_traits_json_writes_what_json_dumps_writes(names: list[str], data: st.DataObject) -> None:
    """The planner compares stored traits texts, so the fast encoding must match exactly."""
    row = data.draw(st.lists(_values, min_size=len(names), max_size=len(names)))
    indexes = [(name, i) for i, name in enumerate(names)]
    expected = {name: json_value(row[i]) for name, i in indexes} or None
    got = traits_json(row, indexes)
    assert got == (None if expected is None else json.dumps(expected, ensure_ascii=False))


@settings(max_examples=300, derandomize=True)
@given(st.text(max_size=300))
def test_normalize_id_of_text(value: str) -> None:
    usable = bool(value.strip()) and len(value) <= 255
    usable = usable and not any(c in value for c in "\n\r\t\x00")
    member, problem = normalize_id(value)
    assert (member == value) if usable else (member is None)
    assert (problem is None) if (usable or not value.strip()) else (problem is not None)


def test_query_error_fails_the_run_and_changes_nothing(
    harness: Harness, receiver: Receiver
) -> None:
    harness.set_members(["a"])
    harness.sync()
    before = harness.memberships()
    harness.audience["query"] = "SELEC user_id FROM members"
    report = harness.sync()
    assert report.status == "failed"
    assert 'query failed on source "warehouse"' in report.error and "syntax error" in report.error
    assert harness.memberships() == before
    assert harness.runs()[-1].status == "failed"


@pytest.mark.parametrize(
    ("query", "traits", "message"),
    [
        ("SELECT email FROM members", ["email"], "it needs a user_id column"),
        ("SELECT user_id FROM members", ["email"], "lists traits email that are not columns"),
    ],
)
def test_query_shape_errors(harness: Harness, query: str, traits: list[str], message: str) -> None:
    harness.set_members(["a"])
    harness.audience.update(query=query, traits=traits)
    report = harness.sync()
    assert report.status == "failed" and message in report.error


def test_sources_are_opened_read_only(harness: Harness) -> None:
    harness.set_members(["a"])
    harness.audience["query"] = "DELETE FROM members RETURNING user_id"
    report = harness.sync()
    assert report.status == "failed" and "readonly" in report.error.replace("-", "")
    with sqlite3.connect(harness.warehouse) as db:
        assert db.execute("SELECT COUNT(*) FROM members").fetchone()[0] == 1


def test_missing_source_file_is_a_clear_error(harness: Harness) -> None:
    harness.source_url = f"sqlite:///{harness.tmp_path / 'nope.db'}"
    report = harness.sync()
    assert report.status == "failed" and "does not exist" in report.error


def test_streaming_many_rows_in_chunks(harness: Harness, receiver: Receiver) -> None:
    with sqlite3.connect(harness.warehouse) as db:
        db.executemany(
            "INSERT INTO members VALUES (?, ?, NULL)",
            ((f"u{i:05d}", f"u{i}@x.co") for i in range(5000)),
        )
    harness.destinations["segment"]["batch_size"] = 1000
    report = harness.sync()  # chunk_size is 1000 in the harness: five chunks
    assert report.members == 5000 and report.destinations[0].sent == 5000
    assert len({m["userId"] for m in receiver.messages()}) == 5000


def test_same_database_fast_path(
    harness: Harness, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    with harness.engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE members (user_id TEXT, email TEXT, anonymous_id TEXT)")
        )
        connection.execute(
            text("INSERT INTO members VALUES (:u, :e, :a)"),
            [
                {"u": "a", "e": "a@x.co", "a": None},
                {"u": "b", "e": "b@x.co", "a": "anon-b"},
                {"u": "b", "e": "b2@x.co", "a": None},
                {"u": None, "e": "c@x.co", "a": "anon-c"},
                {"u": " ", "e": "blank@x.co", "a": None},
                {"u": "x" * 300, "e": "long@x.co", "a": None},
            ],
        )
    harness.source_url = harness.engine.url.render_as_string(hide_password=False)
    harness.audience["query"] = "SELECT user_id, email, anonymous_id FROM members"

    def no_python_path(*args: object, **kwargs: object) -> None:
        raise AssertionError("rows passed through Python")

    if harness.engine.dialect.name not in ("mysql", "mariadb"):  # they take the Python path
        monkeypatch.setattr(sync.run.compute, "stage_from_source", no_python_path)
    report = harness.sync()
    assert report.status == "succeeded", report.error
    assert (report.members, report.invalid, report.duplicates) == (3, 2, 1)
    messages = {m.get("userId") or m["anonymousId"]: m for m in receiver.messages()}
    assert set(messages) == {"a", "b", "anon-c"}
    assert messages["a"]["traits"] == {"email": "a@x.co", KEY: True}
    assert messages["anon-c"]["anonymousId"] == "anon-c" and "userId" not in messages["anon-c"]
    # A second run over the same data sends nothing: traits compare equal across paths.
    receiver.reset()
    assert harness.sync().destinations[0].sent == 0
    with harness.engine.begin() as connection:
        connection.execute(text("DELETE FROM members WHERE user_id = 'a'"))
    harness.sync()
    assert [(m["userId"], m["traits"][KEY]) for m in receiver.messages()] == [("a", False)]


def test_postgresql_sources_run_in_read_only_transactions(
    tmp_path, postgres_schema_url: str, receiver: Receiver
) -> None:
    from sqlalchemy import create_engine

    from sync.state.db import make_state_engine, upgrade

    source = create_engine(postgres_schema_url)
    with source.begin() as connection:
        connection.execute(text("CREATE TABLE members (user_id TEXT, email TEXT)"))
        connection.execute(text("INSERT INTO members VALUES ('p1', 'p1@x.co')"))
        connection.execute(text("CREATE SEQUENCE counter"))
    state = make_state_engine(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        upgrade(state)
        harness = Harness(tmp_path, state, receiver.url)
        harness.source_url = postgres_schema_url
        report = harness.sync()
        assert report.status == "succeeded" and [m["userId"] for m in receiver.messages()] == ["p1"]
        # A query with a side effect (nextval writes) is refused by the read-only transaction.
        harness.audience["query"] = "SELECT user_id, email, nextval('counter') AS n FROM members"
        report = harness.sync()
        assert report.status == "failed" and "read-only transaction" in report.error
        with source.connect() as connection:
            assert connection.execute(text("SELECT nextval('counter')")).scalar() == 1
    finally:
        state.dispose()
        source.dispose()
