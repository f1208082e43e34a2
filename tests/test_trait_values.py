"""Every value type a trait group takes round-trips from a PostgreSQL warehouse into the
message exactly (README "SQL traits"): generated rows of typed columns, synced, compared with
what the warehouse holds."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from sync.config import parse_config
from sync.engine import RunOptions, Syncer
from sync.run.trait_values import InvalidValue, canonical
from tests.harness import WRITE_KEY
from tests.receiver import Receiver

COLUMNS = {
    "label": "text",
    "amount": "numeric(30, 10)",
    "ratio": "double precision",
    "count": "bigint",
    "flag": "boolean",
    "day": "date",
    "at": "timestamptz",
    "local_at": "timestamp",
    "doc": "jsonb",
}
# PostgreSQL text holds no NUL (nor jsonb a \u0000); surrogates are not text.
characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
texts = st.text(characters, max_size=30)
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(characters, max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(characters, max_size=5), inner, max_size=3),
    max_leaves=6,
)
rows = st.fixed_dictionaries(
    {
        "label": st.none() | texts,
        "amount": st.none()
        | st.decimals(min_value=-(10**15), max_value=10**15, places=4, allow_nan=False),
        "ratio": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "count": st.none() | st.integers(-(2**63), 2**63 - 1),
        "flag": st.none() | st.booleans(),
        "day": st.none() | st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31)),
        "at": st.none()
        | st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)),
        "local_at": st.none() | st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1)),
        "doc": st.none() | json_docs,
    }
)
_examples = itertools.count()


def expected(name: str, value: Any) -> Any:
    """What the message must carry for a warehouse value (parsed with Decimal floats)."""
    if value is None:
        return None
    if name == "amount":
        return Decimal(value)
    if name == "ratio":
        return Decimal(repr(value))
    if name == "day":
        return value.isoformat()
    if name == "at":
        return value.astimezone(dt.UTC).replace(tzinfo=None).isoformat() + "Z"
    if name == "local_at":
        return value.isoformat() + "Z"
    if name == "doc":
        return json.loads(json.dumps(value), parse_float=Decimal)
    return value


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(generated=st.lists(rows, min_size=1, max_size=6))
def test_values_round_trip_from_postgresql_into_messages(
    generated: list[dict[str, Any]],
    postgres_schema_url: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    number = next(_examples)
    table = f"values_{number}"
    warehouse = create_engine(postgres_schema_url)
    try:
        with warehouse.begin() as connection:
            columns = ", ".join(f'"{c}" {t}' for c, t in COLUMNS.items())
            connection.execute(text(f"CREATE TABLE {table} (user_id text, {columns})"))
            for i, row in enumerate(generated):
                values = {**row, "doc": None if row["doc"] is None else json.dumps(row["doc"])}
                connection.execute(
                    text(
                        f"INSERT INTO {table} VALUES (:user_id, "
                        + ", ".join(f"CAST(:{c} AS {t})" for c, t in COLUMNS.items())
                        + ")"
                    ),
                    {"user_id": f"u{i}", **values},
                )
        receiver.reset()
        _sync(postgres_schema_url, table, tmp_path, receiver)
        sent = {m["userId"]: m["traits"] for m in _exact_messages(receiver)}
        assert sent == {
            f"u{i}": {name: expected(name, row[name]) for name in COLUMNS}
            for i, row in enumerate(generated)
        }
    finally:
        warehouse.dispose()


def _sync(source_url: str, table: str, tmp_path: Path, receiver: Receiver) -> None:
    # A state DB per example: each example's group is new, and the ones before it (removed
    # from the config, not retired) would still hold these trait names at the destination.
    state = tmp_path / f"state-{table}.db"
    config = parse_config(
        f"""
[state]
url = "sqlite:///{state}"
auto_upgrade = true
[sources.pg]
url = "{source_url}"
[destinations.segment]
type = "segment"
write_key = "{WRITE_KEY}"
endpoint = "{receiver.url}"
[[traits]]
name = "{table}"
source = "pg"
query = "SELECT * FROM {table}"
destinations = ["segment"]
""",
        "values.toml",
        tmp_path,
        {},
    )
    with Syncer(config) as syncer:
        report = syncer.sync(config.traits[0], RunOptions())
    assert report.status == "succeeded" and report.invalid == 0, report


def _exact_messages(receiver: Receiver) -> list[dict[str, Any]]:
    """The messages of every request, parsed from the bytes received with exact numbers."""
    return [
        message
        for request in receiver.requests
        for message in json.loads(request.raw, parse_float=Decimal)["batch"]
    ]


def test_values_without_a_json_form_are_refused() -> None:
    for value, reason in [
        (float("nan"), "nan is not a JSON number"),
        (float("-inf"), "-inf is not a JSON number"),
        (Decimal("NaN"), "NaN is not a JSON number"),
        (b"\x00", "bytes are not a trait value"),
        ("bad \udcff", "not valid UTF-8"),
        ({1: "x"}, "keys that are not text"),
        (object(), "has no JSON form"),
    ]:
        try:
            canonical(value)
        except InvalidValue as invalid:
            assert reason in str(invalid), (value, invalid)
        else:
            raise AssertionError(f"{value!r} was accepted")
    assert canonical(Decimal("12.50")) == "12.5" and canonical(Decimal("1E+3")) == "1000"
    assert canonical({"b": [1, None], "a": True}) == '{"a":true,"b":[1,null]}'


def test_json_numbers_from_postgresql_are_exact(
    postgres_schema_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """psycopg would read json numbers as floats: 19.990000000000000001 became 19.99 and a
    change in its last digit went unseen (hostile review)."""
    warehouse = create_engine(postgres_schema_url)
    try:
        with warehouse.begin() as connection:
            connection.execute(text("CREATE TABLE docs (user_id text, doc jsonb)"))
            connection.execute(
                text("INSERT INTO docs VALUES ('u1', '{\"price\": 19.990000000000000001}')")
            )
        _sync(postgres_schema_url, "docs", tmp_path, receiver)
        with warehouse.begin() as connection:
            connection.execute(
                text("UPDATE docs SET doc = '{\"price\": 19.990000000000000002}'")
            )
        _sync(postgres_schema_url, "docs", tmp_path, receiver)
        prices = [m["traits"]["doc"]["price"] for m in _exact_messages(receiver)]
        assert prices == [Decimal("19.990000000000000001"), Decimal("19.990000000000000002")]
    finally:
        warehouse.dispose()
