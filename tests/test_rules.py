"""Rules compiled to SQL give the same members and values as a plain Python evaluation of the
same rules over the same generated warehouse, on SQLite, PostgreSQL and MariaDB sources."""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from sync.config import parse_config
from sync.engine import RunOptions, Syncer
from sync.rules import (
    AudienceDefinition,
    Catalog,
    RuleProblems,
    SourceRules,
    TraitGroupDefinition,
    compile_audience,
    compile_trait_group,
    parse_condition,
    parse_trait_rules,
)
from sync.rules.model import Condition
from sync.state.db import make_state_engine, upgrade
from tests.conftest import mysql_base_url, postgres_base_url
from tests.rules_oracle import Oracle
from tests.warehouse_gen import NOW, NOW_QUERY, Warehouse, generate, load, set_clock

WAREHOUSE = generate()
RULES = SourceRules(now_query=NOW_QUERY)

# Trait groups every audience may read through computed_trait.
TRAITS_TOML = """
orders_30d = { count = { event = "Order Completed", within = "30d" } }
revenue_90d = { sum = { event = "Order Completed", property = "revenue", within = "90d" } }
avg_price = { avg = { event = "Product Viewed", property = "price" } }
cheapest_view = { min = { event = "Product Viewed", property = "price", between = ["60d", "7d"] } }
priciest_view = { max = { event = "Product Viewed", property = "price", where = [ { property = "category", op = "in", value = ["toys", "games"] } ] } }
favorite_category = { most_frequent = { event = "Product Viewed", property = "category" } }
first_currency = { first = { event = "Order Completed", property = "currency" } }
last_platform = { last = { event = "App Opened", property = "platform", within = "60d" } }
categories = { unique_list = { event = "Order Completed", property = "category" } }
category_count = { unique_count = { event = "Product Viewed", property = "category", within = "30d" } }
"""
TRAITS = parse_trait_rules(tomllib.loads(TRAITS_TOML), "traits[0].rules")
GROUP = TraitGroupDefinition("Stats", "stats", "w", "traits[0]", traits=TRAITS)
# An audience other rules name in member_of.
BASE_TOML = '{ event = "Order Completed", count = ">= 2", within = "60d" }'
BASE = parse_condition(tomllib.loads(f"r = {BASE_TOML}")["r"], "audiences[0].rules")


def _postgres_url() -> Iterator[str]:
    base = postgres_base_url()
    schema = f"w_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _mariadb_url() -> Iterator[str]:
    base = make_url(mysql_base_url())
    database = f"w_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE `{database}`"))
    try:
        yield base.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE `{database}`"))
        admin.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def warehouse(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """The generated warehouse, loaded once per module on each source database."""
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{tmp_path_factory.mktemp('w') / 'w.db'}"])
    elif request.param == "postgresql":
        urls = _postgres_url()
    else:
        urls = _mariadb_url()
    url = next(urls)
    engine = create_engine(url)
    load(engine, WAREHOUSE)
    yield engine
    engine.dispose()
    next(urls, None)  # drops the schema or database


def catalog(*audiences: AudienceDefinition) -> Catalog:
    base = AudienceDefinition("Base", "base", "w", "audiences[0]", condition=BASE)
    return Catalog((base, *audiences), (GROUP,))


def sql_members(engine: Engine, condition: Condition, include_anonymous: bool) -> set[Any]:
    audience = AudienceDefinition(
        "Tested",
        "tested",
        "w",
        "audiences[1]",
        condition=condition,
        include_anonymous=include_anonymous,
    )
    statement = compile_audience(audience, catalog(audience), RULES)
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    assert len(rows) == len({(r.user_id, r.anonymous_id) for r in rows}), "duplicate members"
    return {(r.user_id, False) if r.user_id is not None else (r.anonymous_id, True) for r in rows}


def oracle(now: Any = NOW, warehouse: Warehouse = WAREHOUSE) -> Oracle:
    return Oracle(warehouse, now, {"Base": (BASE, False), "base": (BASE, False)}, TRAITS)


ORACLE = oracle()

# One case per condition type and operator family: (id, rules table as TOML, anonymous).
CONDITIONS = [
    ("performed", '{ event = "Order Completed" }', False),
    ("count_within", '{ event = "Order Completed", count = ">= 2", within = "30d" }', False),
    ("count_exact", '{ event = "Product Viewed", count = "= 3", within = "60d" }', False),
    ("not_performed", '{ event = "App Opened", count = "= 0", within = "14d" }', False),
    ("count_less", '{ event = "App Opened", count = "< 2", within = "45d" }', False),
    ("between", '{ event = "Order Completed", between = ["90d", "30d"] }', False),
    (
        "where_gt",
        '{ event = "Order Completed", where = [ { property = "revenue", op = ">", value = 300 } ] }',
        False,
    ),
    (
        "where_in",
        '{ event = "Product Viewed", count = ">= 2", where = [ { property = "category", op = "in", value = ["toys", "books"] } ] }',
        False,
    ),
    (
        "where_contains",
        '{ event = "Product Viewed", within = "20d", where = [ { property = "category", op = "contains", value = "oo" } ] }',
        False,
    ),
    (
        "where_starts_with",
        '{ event = "Product Viewed", within = "20d", where = [ { property = "category", op = "starts_with", value = "g" } ] }',
        False,
    ),
    (
        "where_exists_false",
        '{ event = "Order Completed", where = [ { property = "currency", op = "exists", value = false } ] }',
        False,
    ),
    (
        "where_ne_le",
        '{ event = "Checkout Started", where = [ { property = "cart_value", op = "<=", value = 100 }, { property = "cart_value", op = "!=", value = 50 } ] }',
        False,
    ),
    ("trait_eq", '{ trait = "plan", op = "=", value = "pro" }', False),
    ("trait_ne", '{ trait = "plan", op = "!=", value = "free" }', False),
    ("trait_ge", '{ trait = "age", op = ">=", value = 65 }', False),
    ("trait_exists", '{ not = { trait = "age", op = "exists", value = true } }', False),
    ("computed_sum", '{ computed_trait = "revenue_90d", op = ">", value = 500 }', False),
    (
        "computed_most_frequent",
        '{ computed_trait = "favorite_category", op = "=", value = "toys" }',
        False,
    ),
    ("member_of", '{ member_of = "Base" }', False),
    (
        "not_member_of",
        '{ all = [ { trait = "country", op = "=", value = "de" }, { not = { member_of = "base" } } ] }',
        False,
    ),
    (
        "followed_by",
        '{ event = "Checkout Started", within = "30d", followed_by = { event = "Order Completed", within = "1d" } }',
        False,
    ),
    (
        "not_followed_by",
        '{ event = "Checkout Started", within = "30d", not_followed_by = { event = "Order Completed", within = "1d" } }',
        False,
    ),
    (
        "funnel_where",
        '{ event = "Checkout Started", followed_by = { event = "Order Completed", within = "12h", where = [ { property = "revenue", op = ">=", value = 100 } ] } }',
        False,
    ),
    (
        "nested",
        '{ all = [ { event = "Order Completed", count = ">= 2", within = "30d" }, { not = { event = "App Opened", within = "14d" } }, { any = [ { trait = "plan", op = "=", value = "pro" }, { computed_trait = "revenue_90d", op = ">", value = 500 } ] } ] }',
        False,
    ),
    ("anonymous", '{ event = "App Opened", within = "30d" }', True),
    ("anonymous_not", '{ not = { event = "Product Viewed", within = "60d" } }', True),
    (
        "anonymous_member_of",
        '{ any = [ { member_of = "Base" }, { event = "Checkout Started", within = "10d" } ] }',
        True,
    ),
]


@pytest.mark.parametrize(
    ("rules", "anonymous"), [c[1:] for c in CONDITIONS], ids=[c[0] for c in CONDITIONS]
)
def test_condition_matches_python(warehouse: Engine, rules: str, anonymous: bool) -> None:
    condition = parse_condition(tomllib.loads(f"r = {rules}")["r"], "audiences[1].rules")
    expected = ORACLE.members(condition, anonymous)
    assert expected, "a case that selects nobody proves little"
    assert sql_members(warehouse, condition, anonymous) == expected


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-6)
    return bool(a == b)


@pytest.mark.parametrize("name", sorted(TRAITS))
def test_computed_trait_matches_python(warehouse: Engine, name: str) -> None:
    group = TraitGroupDefinition("One", "one", "w", "traits[1]", traits={name: TRAITS[name]})
    statement = compile_trait_group(group, catalog(), RULES)
    with warehouse.connect() as connection:
        rows = connection.execute(statement).all()
    found = {row.user_id: _number(getattr(row, name)) for row in rows}
    expected = ORACLE.trait_values(name)
    assert expected
    assert found.keys() == expected.keys()
    wrong = [(u, found[u], expected[u]) for u in expected if not _same(found[u], expected[u])]
    assert not wrong[:5], f"{len(wrong)} users differ, e.g. {wrong[:5]}"


def _number(value: Any) -> Any:
    from decimal import Decimal

    return float(value) if isinstance(value, Decimal) else value


def test_trait_group_of_every_computation_in_one_select(warehouse: Engine) -> None:
    statement = compile_trait_group(GROUP, catalog(), RULES)
    with warehouse.connect() as connection:
        rows = {row.user_id: row for row in connection.execute(statement)}
    every = {u for name in TRAITS for u in ORACLE.trait_values(name)}
    assert rows.keys() == every
    some = sorted(every)[:50]
    for user_id in some:
        for name in TRAITS:
            expected = ORACLE.trait_values(name).get(user_id)
            got = _number(getattr(rows[user_id], name))
            assert (got is None and expected is None) or _same(got, expected), (user_id, name)
    # unique_list is a JSON array, sorted, on every database
    lists = [r.categories for r in rows.values() if r.categories is not None]
    assert lists and all(isinstance(v, list) and v == sorted(set(v)) for v in lists)


# --- random nested rule sets ---------------------------------------------------------------

_WINDOWS = st.sampled_from(
    [{}, {"within": "7d"}, {"within": "30d"}, {"within": "90d"}, {"between": ["60d", "14d"]}]
)
_EVENT = st.builds(
    lambda event, count, window, where: {"event": event, **count, **window, **where},
    st.sampled_from(["Order Completed", "Product Viewed", "App Opened", "Checkout Started"]),
    st.sampled_from([{}, {"count": ">= 2"}, {"count": "= 0"}, {"count": "< 3"}, {"count": "= 1"}]),
    _WINDOWS,
    st.just({}),
)
_PRODUCT = st.builds(
    lambda op, value, window: {
        "event": "Product Viewed",
        **window,
        "where": [{"property": "category", "op": op, "value": value}],
    },
    st.sampled_from(["=", "!=", "contains"]),
    st.sampled_from(["toys", "books", "o"]),
    _WINDOWS,
)
_TRAIT = st.builds(
    lambda name_op_value: {
        "trait": name_op_value[0],
        "op": name_op_value[1],
        "value": name_op_value[2],
    },
    st.sampled_from(
        [
            ("plan", "=", "pro"),
            ("plan", "in", ["free", "trial"]),
            ("age", "<", 30),
            ("country", "!=", "us"),
            ("age", "exists", False),
        ]
    ),
)
_COMPUTED = st.sampled_from(
    [
        {"computed_trait": "orders_30d", "op": ">=", "value": 1},
        {"computed_trait": "favorite_category", "op": "=", "value": "books"},
        {"computed_trait": "avg_price", "op": ">", "value": 150},
    ]
)
_FUNNEL = st.builds(
    lambda key, within: {
        "event": "Checkout Started",
        "within": "60d",
        key: {"event": "Order Completed", "within": within},
    },
    st.sampled_from(["followed_by", "not_followed_by"]),
    st.sampled_from(["6h", "1d"]),
)
_LEAF = st.one_of(_EVENT, _PRODUCT, _TRAIT, _COMPUTED, _FUNNEL, st.just({"member_of": "Base"}))
_RULES = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=6,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rules=_RULES, anonymous=st.booleans())
def test_random_rule_sets_match_python(
    warehouse: Engine, rules: dict[str, Any], anonymous: bool
) -> None:
    condition = parse_condition(rules, "audiences[1].rules")
    assert sql_members(warehouse, condition, anonymous) == ORACLE.members(condition, anonymous)


# --- the clock ----------------------------------------------------------------------------


def test_a_member_leaves_a_30_day_audience_when_the_clock_moves(
    warehouse: Engine, tmp_path: Path
) -> None:
    """A real sync: the clock (now_query) moves past a member's last event, nothing else."""
    rules = '{ event = "Order Completed", within = "30d" }'
    condition = parse_condition(tomllib.loads(f"r = {rules}")["r"], "r")
    before = ORACLE.members(condition, False)
    # The member whose last order is oldest (still within 30 days): moving the clock to just
    # after its 30 days end removes it, and who else goes depends on nobody else's rows.
    last_order = {
        user: max(
            r["timestamp"]
            for r in WAREHOUSE.events["Order Completed"]
            if r["user_id"] == user and r["timestamp"] <= NOW
        )
        for user, _ in before
    }
    leaver = min(last_order, key=lambda u: last_order[u])
    later = last_order[leaver] + timedelta(days=30, seconds=1)
    after = oracle(later).members(condition, False)
    assert (leaver, False) not in after
    url = warehouse.url.render_as_string(hide_password=False)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = parse_config(
        f"""
[state]
url = "{state_url}"
auto_upgrade = true
[sources.w]
url = "{url}"
now_query = "{NOW_QUERY}"
[destinations.out]
type = "file"
path = "out.jsonl"
[[audiences]]
name = "Ordered 30d"
source = "w"
destinations = ["out"]
max_removal_ratio = 1
[audiences.rules]
event = "Order Completed"
within = "30d"
""",
        "test.toml",
        tmp_path,
        {},
    )
    engine = make_state_engine(state_url)
    upgrade(engine)
    try:
        syncer = Syncer(config, engine)
        syncer.sync(config.audiences[0], RunOptions())
        set_clock(warehouse, later)
        try:
            syncer.sync(config.audiences[0], RunOptions())
        finally:
            set_clock(warehouse, NOW)
    finally:
        engine.dispose()
    messages = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    first = {m["userId"] for m in messages if m["traits"]["ordered_30d"] is True}
    left = {m["userId"] for m in messages if m["traits"]["ordered_30d"] is False}
    assert first >= {u for u, _ in before}
    assert leaver in left
    assert left == {u for u, _ in before} - {u for u, _ in after}


# --- user input is data --------------------------------------------------------------------

HOSTILE = ["it's", 'say "hi"', "a; DROP TABLE users; --", "/* x */", "100%_", "\\", "--"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_bound_data(warehouse: Engine, value: str) -> None:
    rules = {
        "any": [
            {"trait": "plan", "op": "=", "value": value},
            {
                "event": "Product Viewed",
                "where": [{"property": "category", "op": "contains", "value": value}],
            },
            {
                "event": "Product Viewed",
                "where": [{"property": "category", "op": "starts_with", "value": value}],
            },
            {
                "event": "Order Completed",
                "where": [{"property": "currency", "op": "in", "value": [value, "x"]}],
            },
        ]
    }
    condition = parse_condition(rules, "r")
    audience = AudienceDefinition("T", "t", "w", "audiences[1]", condition=condition)
    statement = compile_audience(audience, catalog(audience), RULES)
    sql = str(statement.compile(dialect=warehouse.dialect))
    assert value not in sql
    assert sql_members(warehouse, condition, False) == set()  # nobody has such a value
    with warehouse.connect() as connection:  # and every table is still there
        assert connection.execute(text("SELECT count(*) FROM users")).scalar() == len(
            WAREHOUSE.users
        )


@pytest.mark.parametrize(
    "name", ["Order'; DROP TABLE users; --", 'x" OR 1=1', "/* comment */ revenue"]
)
def test_hostile_names_become_identifiers_or_are_refused(name: str) -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    condition = parse_condition(
        {"event": name, "where": [{"property": name, "op": "=", "value": 1}]}, "r"
    )
    audience = AudienceDefinition("T", "t", "w", "audiences[1]", condition=condition)
    statement = compile_audience(audience, catalog(audience), RULES)
    for dialect in (sqlite.dialect(), postgresql.dialect(), mysql.dialect()):
        sql = str(statement.compile(dialect=dialect))
        assert name not in sql and ";" not in sql and "--" not in sql and "/*" not in sql
    # Used as written, such a name is no identifier: a clear error with its TOML path.
    as_is = SourceRules(schema=RULES.schema.model_copy(update={"names": "as_is"}))
    with pytest.raises(RuleProblems) as raised:
        compile_audience(audience, catalog(audience), as_is)
    assert "audiences[1].rules.event: event" in str(raised.value)
    assert "audiences[1].rules.where[0].property" in str(raised.value)
    assert "not a valid table or column name" in str(raised.value)


# --- config problems ------------------------------------------------------------------------

_CONFIG = """
[sources.w]
url = "sqlite:///w.db"
[destinations.out]
type = "file"
path = "out.jsonl"
[[audiences]]
name = "A"
source = "w"
destinations = ["out"]
[audiences.rules]
{a}
[[audiences]]
name = "B"
source = "w"
destinations = ["out"]
[audiences.rules]
{b}
"""


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ('event = "X"\ncount = "~ 2"', 'event = "X"', "audiences[0].rules.count: not a count"),
        (
            'event = "X"\nwithin = "30 days"',
            'event = "X"',
            "audiences[0].rules.within: not a time window",
        ),
        (
            'all = [ { trait = "plan", op = "like", value = "x" } ]',
            'event = "X"',
            "audiences[0].rules.all[0].op: unknown operator 'like'",
        ),
        (
            'member_of = "Nobody"',
            'event = "X"',
            'audiences[0].rules.member_of: no audience named "Nobody"',
        ),
        ('member_of = "B"', 'not = { member_of = "a" }', "in a cycle: A → B → A"),
        (
            'computed_trait = "ltv"\nop = ">"\nvalue = 1',
            'event = "X"',
            'no trait group defines a trait "ltv"',
        ),
    ],
)
def test_config_reports_rule_problems_with_their_path(
    tmp_path: Path, a: str, b: str, expected: str
) -> None:
    from sync.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(_CONFIG.format(a=a, b=b), "t.toml", tmp_path, {})
    assert any(expected in p for p in raised.value.problems), raised.value.problems


def test_show_sql_and_preview_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sync.cli import cli

    warehouse_path = tmp_path / "w.db"
    engine = create_engine(f"sqlite:///{warehouse_path}")
    load(engine, WAREHOUSE)
    engine.dispose()
    config = tmp_path / "c.toml"
    config.write_text(
        _CONFIG.replace(
            'url = "sqlite:///w.db"',
            f'url = "sqlite:///{warehouse_path}"\nnow_query = "{NOW_QUERY}"',
        ).format(
            a='event = "Order Completed"\nwithin = "30d"\nwhere = [ { property = "currency", op = "=", value = "it\'s" } ]',
            b='event = "Order Completed"\nwithin = "30d"',
        )
    )
    # By default the values are written in, quoted by the dialect: runnable in the client.
    shown = CliRunner().invoke(cli, ["--config", str(config), "show-sql", "A"])
    assert shown.exit_code == 0, shown.output
    assert "r1.currency = 'it''s'" in shown.output
    with sqlite3.connect(warehouse_path) as db:
        pasted = db.execute(shown.output).fetchall()
    db.close()
    assert {row[0] for row in pasted} == {
        m
        for m, _ in ORACLE.members(
            parse_condition(
                {
                    "event": "Order Completed",
                    "within": "30d",
                    "where": [{"property": "currency", "op": "=", "value": "it's"}],
                },
                "r",
            ),
            False,
        )
    }
    # --bound: placeholders, then the values as a run binds them.
    bound = CliRunner().invoke(cli, ["--config", str(config), "show-sql", "A", "--bound"])
    assert "it's" not in bound.output.split("--")[0]
    assert '"it\'s"' in bound.output  # listed as a bound parameter
    previewed = CliRunner().invoke(cli, ["--config", str(config), "preview", "B", "--json"])
    assert previewed.exit_code == 0, previewed.output
    condition = parse_condition({"event": "Order Completed", "within": "30d"}, "r")
    report = json.loads(previewed.output)
    assert report["count"] == len(ORACLE.members(condition, False))
    assert len(report["sample"]) == 10
    assert not (tmp_path / "audience-sync.db").exists()  # preview writes nothing


def test_not_a_member_of_a_sql_audience_with_a_null_id(warehouse: Engine) -> None:
    """`NOT (x IN (… NULL …))` is never true: a SQL audience returning one row without a
    user_id must not empty every "not a member of" audience built on it."""
    from sync.rules.compiler import Catalog

    sql = AudienceDefinition(
        "Some",
        "some",
        "w",
        "audiences[0]",
        query="SELECT id AS user_id FROM users WHERE plan = 'pro' UNION ALL SELECT NULL",
    )
    rules = parse_condition({"not": {"member_of": "Some"}}, "audiences[1].rules")
    tested = AudienceDefinition("Tested", "tested", "w", "audiences[1]", condition=rules)
    statement = compile_audience(tested, Catalog((sql, tested), ()), RULES)
    with warehouse.connect() as connection:
        members = {row.user_id for row in connection.execute(statement)}
        pro = {r[0] for r in connection.execute(text("SELECT id FROM users WHERE plan = 'pro'"))}
        everyone = {r[0] for r in connection.execute(text("SELECT id FROM users"))}
    assert members == everyone - pro and members


@pytest.mark.parametrize("needle", ["%", "_", "%o%"])
def test_contains_takes_wildcard_characters_literally(warehouse: Engine, needle: str) -> None:
    """MariaDB's LIKE read a value's % and _ as wildcards (hostile review: 2241 members where
    SQLite and PostgreSQL found none)."""
    condition = parse_condition(
        {"trait": "plan", "op": "contains", "value": needle}, "audiences[1].rules"
    )
    assert sql_members(warehouse, condition, False) == set()


def test_member_of_a_sql_audience_with_integer_ids(warehouse: Engine) -> None:
    from sync.rules.compiler import Catalog

    sql = AudienceDefinition("Ints", "ints", "w", "audiences[0]", query="SELECT 1 AS user_id")
    rules = parse_condition({"not": {"member_of": "Ints"}}, "audiences[1].rules")
    tested = AudienceDefinition("Tested", "tested", "w", "audiences[1]", condition=rules)
    statement = compile_audience(tested, Catalog((sql, tested), ()), RULES)
    with warehouse.connect() as connection:
        members = {row.user_id for row in connection.execute(statement)}
        everyone = {r[0] for r in connection.execute(text("SELECT id FROM users"))}
    assert members == everyone


def _warehouse_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.db"
    engine = create_engine(f"sqlite:///{path}")
    load(engine, WAREHOUSE)
    engine.dispose()
    return path


def _cli(config: Path, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from sync.cli import cli

    result = CliRunner().invoke(cli, ["--config", str(config), *args], terminal_width=250)
    return result.exit_code, result.output


@pytest.mark.parametrize("name", ["Revenue", "_x", "9lives"])
def test_a_rules_trait_name_that_is_no_trait_key_is_a_config_error(
    tmp_path: Path, name: str
) -> None:
    """``Revenue`` passed check (it is a valid column name), then every run failed telling the
    user to alias a query column — a rules group has no query."""
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[sources.wh]
url = "sqlite:///{_warehouse_file(tmp_path)}"
[destinations.f]
type = "file"
path = "out.jsonl"
[[traits]]
name = "TR"
source = "wh"
destinations = ["f"]
[traits.rules]
{name} = {{ sum = {{ event = "Order Completed", property = "revenue" }} }}
"""
    )
    for command in (["check"], ["sync"], ["show-sql", "TR"]):
        code, output = _cli(config, *command)
        assert code == 2, (command, output)
        assert f"c.toml: traits[0].rules.{name}: not a valid key: '{name}'" in output, output
        assert "alias" not in output and len(output.strip().splitlines()) == 1, output


# Category → the user viewing it: backslashes, quotes and LIKE wildcards as data.
_TRICKY_CATEGORIES = {
    "bo\\oks": "u1",
    "bo\\\\oks": "u2",
    "books": "u3",
    "100%": "u4",
    "100x": "u5",
    "it's": "u6",
}
# (operator, value, the users it selects)
_TRICKY_FILTERS = [
    ("=", "bo\\oks", {"u1"}),
    ("starts_with", "bo\\", {"u1", "u2"}),
    ("contains", "\\oks", {"u1", "u2"}),
    ("contains", "\\\\", {"u2"}),
    ("in", ["bo\\oks", "it's"], {"u1", "u6"}),
    ("=", "100%", {"u4"}),
    ("starts_with", "100%", {"u4"}),
    ("contains", "0%", {"u4"}),
]


def _tricky_warehouse(url: str) -> None:
    from datetime import datetime

    from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert

    metadata = MetaData()
    binary = {"mysql_collate": "utf8mb4_bin", "mysql_charset": "utf8mb4"}
    users = Table("users", metadata, Column("id", String(8), primary_key=True), **binary)
    viewed = Table(
        "product_viewed",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("user_id", String(8)),
        Column("anonymous_id", String(8)),
        Column("timestamp", DateTime),
        Column("category", String(32)),
        **binary,
    )
    engine = create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(users), [{"id": u} for u in _TRICKY_CATEGORIES.values()])
        connection.execute(
            insert(viewed),
            [
                {"id": i, "user_id": u, "timestamp": datetime(2020, 1, 1), "category": category}
                for i, (category, u) in enumerate(_TRICKY_CATEGORIES.items())
            ],
        )
    engine.dispose()


def _pasted(url: str, sql: str) -> set[Any]:
    """The user ids ``sql`` selects when pasted into the database's client: sent as written,
    with no parameters (so the driver changes nothing)."""
    engine = create_engine(url)
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(sql)
        found = {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()
        engine.dispose()
    return found


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"])
def test_show_sql_pasted_into_the_client_selects_what_preview_selects(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    """PostgreSQL's dialect, never connected, doubled backslashes ('bo\\\\oks'), though the server
    (standard_conforming_strings on) reads them literally; psycopg's and PyMySQL's dialects
    doubled every % ('100%%'), which only a driver filling in parameters un-doubles: the
    pasted SQL found other users than preview and runs did."""
    url, config = _tricky_config(request, tmp_path, database)
    for index, (op, value, expected) in enumerate(_TRICKY_FILTERS):
        code, shown = _cli(config, "show-sql", f"A{index}")
        assert code == 0, shown
        code, previewed = _cli(config, "preview", f"A{index}", "--json", "--limit", "100")
        assert code == 0, previewed
        members = {row["user_id"] for row in json.loads(previewed)["sample"]}
        assert members == expected, (op, value)
        assert _pasted(url, shown) == expected, (op, value, shown)


def _tricky_config(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> tuple[str, Path]:
    """A warehouse of ``_TRICKY_CATEGORIES`` on ``database`` and a config with one audience
    per filter of ``_TRICKY_FILTERS`` (``A0``, ``A1``, …)."""
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'w.db'}"
    elif database == "postgresql":
        url = str(request.getfixturevalue("postgres_schema_url"))
    else:
        url = str(request.getfixturevalue("mysql_database_url"))
    _tricky_warehouse(url)
    config = tmp_path / "c.toml"
    audiences = "".join(
        f"""
[[audiences]]
name = "A{index}"
source = "wh"
destinations = ["f"]
[audiences.rules]
event = "Product Viewed"
where = [ {{ property = "category", op = "{op}", value = {json.dumps(value)} }} ]
"""
        for index, (op, value, _) in enumerate(_TRICKY_FILTERS)
    )
    config.write_text(
        f'[sources.wh]\nurl = {json.dumps(url)}\n[destinations.f]\ntype = "file"\n'
        f'path = "out.jsonl"\n{audiences}'
    )
    return url, config


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"])
def test_show_sql_bound_runs_with_the_values_it_lists(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    """``--bound`` printed SQLAlchemy's internal ``IN (__[POSTCOMPILE_param_1])`` for ``in``,
    a placeholder no driver knows, and listed the array as one value."""
    url, config = _tricky_config(request, tmp_path, database)
    for index, (op, value, expected) in enumerate(_TRICKY_FILTERS):
        code, shown = _cli(config, "show-sql", f"A{index}", "--bound")
        assert code == 0, shown
        sql, _, listed = shown.partition("-- parameters (bound, never part of the SQL text):\n")
        params = dict(line.removeprefix("--   ").split(" = ", 1) for line in listed.splitlines())
        values = {name: json.loads(text) for name, text in params.items()}
        engine = create_engine(url)
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            positional = "?" in sql or "%s" in sql  # qmark (SQLite), format (PyMySQL)
            cursor.execute(sql, tuple(values.values()) if positional else values)
            found = {row[0] for row in cursor.fetchall()}
        finally:
            connection.close()
            engine.dispose()
        assert found == expected, (op, value, shown)


def test_show_sql_of_an_unreachable_source_lists_the_values_bound(tmp_path: Path) -> None:
    """How a server reads a literal's backslashes is its setting: without a connection the
    values are not written in, but listed as a run binds them."""
    config = tmp_path / "c.toml"
    config.write_text(
        _CONFIG.replace(
            'url = "sqlite:///w.db"', 'url = "postgresql+psycopg://u@127.0.0.1:1/db"'
        ).format(a='trait = "plan"\nop = "="\nvalue = "bo\\\\oks"', b='event = "X"')
    )
    from click.testing import CliRunner

    from sync.cli import cli

    result = CliRunner().invoke(cli, ["--config", str(config), "show-sql", "A"])
    assert result.exit_code == 0, result.output
    assert 'source "w": cannot learn how it reads SQL literals' in result.stderr
    assert "bo\\\\oks" not in result.stdout.split("-- parameters")[0]
    assert '"bo\\\\oks"' in result.stdout  # JSON: the one backslash, bound


@pytest.mark.parametrize(
    ("rules", "path", "shown"),
    [
        ('trait = "n"\nop = "<"\nvalue = nan', "audiences[0].rules.value", "nan"),
        ('trait = "n"\nop = ">"\nvalue = 1e400', "audiences[0].rules.value", "inf"),
        ('trait = "n"\nop = "="\nvalue = -inf', "audiences[0].rules.value", "-inf"),
        (
            'computed_trait = "n"\nop = "="\nvalue = 99999999999999999999',
            "audiences[0].rules.value",
            "99999999999999999999",
        ),
        (
            'trait = "n"\nop = "!="\nvalue = -9223372036854775809',
            "audiences[0].rules.value",
            "-9223372036854775809",
        ),
        (
            'all = [ { trait = "n", op = "in", value = [1, nan] } ]',
            "audiences[0].rules.all[0].value[1]",
            "nan",
        ),
        (
            'event = "X"\nwhere = [ { property = "p", op = ">=", value = inf } ]',
            "audiences[0].rules.where[0].value",
            "inf",
        ),
        (
            'event = "X"\nfollowed_by = { event = "Y", where = [ { property = "p", op = "in", '
            "value = [9223372036854775808] } ] }",
            "audiences[0].rules.followed_by.where[0].value[0]",
            "9223372036854775808",
        ),
    ],
)
def test_a_rule_number_no_database_can_compare_is_a_config_error(
    tmp_path: Path, rules: str, path: str, shown: str
) -> None:
    """NaN passed check, then selected nobody on SQLite, everyone on PostgreSQL and failed on
    MariaDB; 1e400 (inf) made show-sql print ``r1.n > inf``; 99999999999999999999 failed the
    run with an OverflowError from the SQLite driver."""
    config = tmp_path / "c.toml"
    config.write_text(_CONFIG.format(a=rules, b='event = "X"'))
    code, output = _cli(config, "check")
    assert code == 2, output
    assert f"c.toml: {path}: " in output and shown in output, output
    assert len(output.strip().splitlines()) == 1, output


def test_rule_numbers_at_the_ends_of_the_64_bit_range_are_taken(tmp_path: Path) -> None:
    rules = (
        'any = [ { trait = "n", op = "=", value = 9223372036854775807 },\n'
        '  { trait = "n", op = "in", value = [-9223372036854775808, 1.5e308] } ]'
    )
    config = parse_config(_CONFIG.format(a=rules, b='event = "X"'), "t.toml", tmp_path, {})
    assert config.audiences[0].rules is not None


def test_trait_rules_numbers_no_database_can_compare_are_config_errors(tmp_path: Path) -> None:
    from sync.errors import ConfigError

    toml = """
[sources.w]
url = "sqlite:///w.db"
[destinations.out]
type = "file"
path = "out.jsonl"
[[traits]]
name = "T"
source = "w"
destinations = ["out"]
[traits.rules]
big = { max = { event = "X", property = "p", where = [ { property = "q", op = "<", value = nan } ] } }
"""
    with pytest.raises(ConfigError) as raised:
        parse_config(toml, "t.toml", tmp_path, {})
    assert any(
        p.startswith("traits[0].rules.big.max.where[0].value: ") for p in raised.value.problems
    ), raised.value.problems


def test_a_rules_trait_named_like_an_audience_key_at_its_destination_is_a_config_error(
    tmp_path: Path,
) -> None:
    """A rules trait group's trait names are in the config: one that is an audience's key (or
    a trait an audience carries) at a shared destination is refused by `check`, at its path;
    it passed, then every run failed telling the user to alias a query column it has none of."""
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[sources.wh]
url = "sqlite:///{_warehouse_file(tmp_path)}"
[destinations.f]
type = "file"
path = "out.jsonl"
[[audiences]]
name = "Big Spender"
source = "wh"
query = "SELECT user_id, plan FROM users"
traits = ["plan"]
destinations = ["f"]
[[traits]]
name = "TR"
source = "wh"
destinations = ["f"]
[traits.rules]
big_spender = {{ sum = {{ event = "Order Completed", property = "revenue" }} }}
plan = {{ count = {{ event = "Order Completed" }} }}
"""
    )
    code, output = _cli(config, "check")
    assert code == 2, output
    assert 'traits[0].rules.big_spender: "big_spender" is also the key of audience "Big Spender"' in output
    assert 'traits[0].rules.plan: "plan" is also a trait audience "Big Spender"' in output


def test_a_rules_trait_taken_at_run_time_is_told_to_rename_the_rule() -> None:
    from sync.errors import SourceError
    from sync.run.trait_values import TraitColumns

    held = {"plan": 'trait group "Other" at destination "f"'}
    with pytest.raises(SourceError, match=r"rename it in \[traits.rules\]"):
        TraitColumns("TR", held, rules=True).indexes(["user_id", "plan"])
    with pytest.raises(SourceError, match="alias it in the query"):
        TraitColumns("TR", held).indexes(["user_id", "plan"])
