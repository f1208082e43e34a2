"""One rule for ids and trait values: the same-database path (one ``INSERT … SELECT``) and the
streaming path (rows through Python) stage the same rows from the same query (issue #10,
finding 12)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text

from sync.run.same_database import stage_in_database
from sync.run.sources import make_source_engine
from sync.run.staging import SnapshotStats, stage_from_source
from sync.state.tables import STAGED

SAME_DB_RUN, STREAMED_RUN = 1, 2


def _canonical(traits: Any) -> str | None:
    return None if traits is None else json.dumps(traits, sort_keys=True)


def _staged(connection: Connection, run_id: int) -> list[tuple[Any, ...]]:
    rows = connection.execute(
        select(STAGED.c.id_kind, STAGED.c.member_id, STAGED.c.anonymous_id, STAGED.c.traits)
        .where(STAGED.c.run_id == run_id)
        .order_by(STAGED.c.id_kind, STAGED.c.member_id)
    ).all()
    return [(kind, member, anon, _canonical(traits)) for kind, member, anon, traits in rows]


def _counts(stats: SnapshotStats) -> tuple[Any, ...]:
    return (stats.rows, stats.staged, stats.invalid, stats.duplicates, sorted(stats.samples))


def _both_paths(
    engine: Engine, query: str, traits: list[str]
) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
    """Stage ``query`` as a same-database source (falling back to streaming as the runner
    does) and as a streamed source; return both results and whether SQL staged it."""
    url = engine.url.render_as_string(hide_password=False)
    names = {"audience": 'audience "A"', "source_name": "w", "query": query, "traits": traits}
    with engine.connect() as connection:
        same = stage_in_database(connection, SAME_DB_RUN, **names)
        in_sql = same is not None
        source = make_source_engine("w", url)
        try:
            if same is None:
                same = stage_from_source(source, connection, SAME_DB_RUN, chunk_size=3, **names)
            streamed = stage_from_source(source, connection, STREAMED_RUN, chunk_size=3, **names)
        finally:
            source.dispose()
        results = (
            (_staged(connection, SAME_DB_RUN), _counts(same)),
            (_staged(connection, STREAMED_RUN), _counts(streamed)),
        )
        connection.rollback()
    return results[0], results[1], in_sql


def _mysql(engine: Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def _fill(engine: Engine, ddl: str, table: str, rows: list[tuple[Any, ...]]) -> None:
    with engine.begin() as connection:
        connection.execute(text(ddl))
        width = len(rows[0])
        marks = ", ".join(f":p{i}" for i in range(width))
        connection.execute(
            text(f"INSERT INTO {table} VALUES ({marks})"),
            [{f"p{i}": v for i, v in enumerate(row)} for row in rows],
        )


TEXT_IDS: list[tuple[Any, ...]] = [
    ("a", None, "a@x.co", 1),
    (" b ", "anon-b", "b@x.co", None),
    ("", "anon-empty", "e@x.co", 2),
    ("   ", None, "blank@x.co", 3),
    ("\u3000", "  ", "ideographic-space@x.co", 4),
    ("\xa0x\xa0", "\u2003", "nbsp@x.co", 5),
    (None, "anon-only", "anon@x.co", 6),
    (None, "\t", "tab-anon@x.co", 7),
    ("x" * 255, None, "max@x.co", 8),
    ("y" * 300, None, "long@x.co", 9),
    ("tab\tid", None, "tab@x.co", 10),
    ("new\nline", None, "nl@x.co", 11),
    ("Müller", None, "quote\"and\\back\nslash", 12),
    ("a", None, "dup@x.co", 13),
    ("u-big", None, "big@x.co", 2**62),
]


def test_text_ids_stage_alike_on_both_paths(state_engine: Engine) -> None:
    _fill(
        state_engine,
        "CREATE TABLE people (user_id TEXT, anonymous_id TEXT, email TEXT, n BIGINT)",
        "people",
        TEXT_IDS,
    )
    query = "SELECT user_id, anonymous_id, email, n FROM people"
    same, streamed, in_sql = _both_paths(state_engine, query, ["email", "n"])
    # MariaDB/MySQL always take the Python path (README: the same-database fast path).
    assert in_sql is not _mysql(state_engine), "plain text ids and text/integer traits in SQL"
    assert same == streamed
    members = {row[1] for row in same[0]}
    expected = {"a", " b ", "anon-empty", "\xa0x\xa0", "anon-only", "x" * 255, "Müller", "u-big"}
    assert members == expected
    rows, staged, invalid, duplicates, _ = same[1]
    assert (rows, staged, invalid, duplicates) == (15, 8, 6, 1)


def test_integer_ids_stage_alike_on_both_paths(state_engine: Engine) -> None:
    _fill(
        state_engine,
        "CREATE TABLE counted (user_id BIGINT, email TEXT)",
        "counted",
        [(42, "a@x.co"), (7, "b@x.co"), (-3, None), (2**62, "c@x.co"), (None, "d@x.co")],
    )
    same, streamed, in_sql = _both_paths(
        state_engine, "SELECT user_id, email FROM counted", ["email"]
    )
    assert in_sql is not _mysql(state_engine)
    assert same == streamed
    assert {row[1] for row in same[0]} == {"42", "7", "-3", str(2**62)}


def _numeric_rows(dialect: str) -> tuple[str, list[tuple[Any, ...]], str]:
    """Ids and traits that are not plain text or integers: 42.0, 7 and 7.00 as NUMERIC, NaN,
    infinities, fractions, nested JSON."""
    rows: list[tuple[Any, ...]] = [
        (42.0, 42.0, 1.5, '{"a": [1, {"b": null}]}'),
        (7, 7, 0.1 + 0.2, "[]"),
        (7.0, "7.00", float("nan"), "{}"),
        (4.5, "4.5", float("inf"), "1"),
        (float("inf"), "1", float("-inf"), "null"),
        ("t-1", "10.00", 1e300, '"text"'),
    ]
    if dialect == "postgresql":
        ddl = "CREATE TABLE mixed (user_id DOUBLE PRECISION, num NUMERIC, score DOUBLE PRECISION, doc JSONB)"
        rows = [r for r in rows if not isinstance(r[0], str)]
        rows.append((float("nan"), "NaN", None, '{"k": "v"}'))
        return ddl, rows, "SELECT user_id, num, score, doc FROM mixed"
    if dialect in ("mysql", "mariadb"):
        # No untyped columns, and DOUBLE cannot hold NaN or infinities.
        ddl = "CREATE TABLE mixed (user_id DOUBLE, num DECIMAL(20, 2), score DOUBLE, doc TEXT)"
        finite = [r for r in rows if not isinstance(r[0], str)]
        rows = [r for r in finite if all(math.isfinite(v) for v in (r[0], r[2]))]
        return ddl, rows, "SELECT user_id, num, score, doc FROM mixed"
    ddl = "CREATE TABLE mixed (user_id, num NUMERIC, score REAL, doc TEXT)"
    return ddl, rows, "SELECT user_id, num, score, doc FROM mixed"


def test_numbers_nan_and_json_stage_alike_on_both_paths(state_engine: Engine) -> None:
    ddl, rows, query = _numeric_rows(state_engine.dialect.name)
    _fill(state_engine, ddl, "mixed", rows)
    same, streamed, _ = _both_paths(state_engine, query, ["num", "score", "doc"])
    assert same == streamed
    by_id = {row[1]: json.loads(row[3]) for row in same[0]}
    # Integral numbers are their integer text: 42.0 is "42"; 7 and 7.0 are one member.
    assert {"42", "7"} <= set(by_id)
    assert not {"42.0", "7.0", "4.5", "inf", "nan", "NaN"} & set(by_id)
    # NaN and infinities have no JSON form: they are null; 7.00 as NUMERIC is 7.
    assert by_id["42"]["num"] == 42 and by_id["7"]["num"] == 7
    assert by_id["7"]["score"] == pytest.approx(0.1 + 0.2)


def test_id_with_nul_is_invalid_on_both_paths(state_engine: Engine) -> None:
    if state_engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL text cannot hold NUL")
    _fill(
        state_engine,
        "CREATE TABLE nul (user_id TEXT, email TEXT)",
        "nul",
        [("ok", "a\x00b"), ("nul\x00id", "x@x.co")],
    )
    same, streamed, _ = _both_paths(state_engine, "SELECT user_id, email FROM nul", ["email"])
    assert same == streamed
    assert [row[1] for row in same[0]] == ["ok"]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT user_id, email FROM people ORDER BY user_id -- newest first",
        "SELECT user_id, email FROM people;\n-- done\n",
        "SELECT user_id, email, 'other' AS email FROM people",
    ],
    ids=["trailing_comment", "semicolon_then_comment", "repeated_column"],
)
def test_queries_the_streaming_path_takes_work_on_the_same_database(
    state_engine: Engine, query: str
) -> None:
    """The same-database path wraps the query in a subquery: a trailing comment or semicolon,
    or a column named twice, must not make it fail where the streaming path works."""
    _fill(
        state_engine,
        "CREATE TABLE people (user_id TEXT, email TEXT)",
        "people",
        [("a", "a@x.co"), ("b", "b@x.co")],
    )
    same, streamed, _ = _both_paths(state_engine, query, ["email"])
    assert same == streamed
    assert [row[1] for row in same[0]] == ["a", "b"]


def _both_trait_paths(engine: Engine, query: str) -> tuple[Any, Any, bool]:
    """A trait group's query staged by SQL (as the runner does) and by streaming: the staged
    (kind, member, value) rows and the counts of each, and whether SQL staged it."""
    from sync.run.trait_values import TraitColumns

    url = engine.url.render_as_string(hide_password=False)
    names = {"audience": 'trait group "G"', "source_name": "w", "query": query, "traits": []}
    columns = TraitColumns("G")
    with engine.connect() as connection:
        same = stage_in_database(connection, SAME_DB_RUN, trait_columns=columns, **names)
        in_sql = same is not None
        source = make_source_engine("w", url)
        try:
            if same is None:
                same = stage_from_source(
                    source, connection, SAME_DB_RUN, chunk_size=3, trait_columns=columns, **names
                )
            streamed = stage_from_source(
                source, connection, STREAMED_RUN, chunk_size=3, trait_columns=columns, **names
            )
        finally:
            source.dispose()

        def staged(run_id: int) -> list[tuple[Any, ...]]:
            return list(
                connection.execute(
                    select(STAGED.c.id_kind, STAGED.c.member_id, STAGED.c.value)
                    .where(STAGED.c.run_id == run_id)
                    .order_by(STAGED.c.id_kind, STAGED.c.member_id)
                ).all()
            )

        results = (
            (staged(SAME_DB_RUN), _counts(same), same.trait_names),
            (staged(STREAMED_RUN), _counts(streamed), streamed.trait_names),
        )
        connection.rollback()
    return results[0], results[1], in_sql


TRICKY_TEXT = [
    "plain",
    'quote " and \\ backslash',
    "tab\tnew\nline\rreturn",
    "bell\u0007 and \u001f unit",
    "ünïcödé ✓ 😀 \u2028 \u0085",
    "",
    " spaced ",
]


def test_trait_group_rows_stage_alike_on_both_paths(state_engine: Engine) -> None:
    """(MariaDB/MySQL state DBs always stream: both results come from streaming there.)"""
    with state_engine.begin() as connection:
        connection.execute(text("CREATE TABLE tv (user_id TEXT, note TEXT, n BIGINT, big TEXT)"))
        for i, note in enumerate(TRICKY_TEXT):
            connection.execute(
                text("INSERT INTO tv VALUES (:u, :note, :n, :big)"),
                {"u": f"u{i}", "note": note, "n": i * 10**12 - 3, "big": None},
            )
        connection.execute(
            text("INSERT INTO tv VALUES ('nulls', NULL, NULL, NULL), ('huge', 'x', 1, :big)"),
            {"big": "y" * 17_000},
        )
    try:
        same, streamed, in_sql = _both_trait_paths(state_engine, "SELECT * FROM tv")
        assert in_sql is (state_engine.dialect.name in ("sqlite", "postgresql"))
        assert same == streamed
        rows, counts, names = same
        assert names == ["big", "n", "note"]
        assert counts[2] == 1 and "over the limit of 16,384" in counts[4][0]
        values = {m: None if value is None else json.loads(value) for _, m, value in rows}
        assert values["huge"] is None  # held: staged without values, its member keeps its own
        assert values["u1"]["note"] == 'quote " and \\ backslash'
        assert values["nulls"] == {"big": None, "n": None, "note": None}
    finally:
        with state_engine.begin() as connection:
            connection.execute(text("DROP TABLE tv"))
