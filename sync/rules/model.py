"""The rule language's shape: TOML tables parsed into frozen dataclasses, every problem reported
with its TOML path (``audiences[0].rules.all[1].count: ...``).

Parsing is pure (no database): ``parse_condition`` for an audience's ``rules``,
``parse_trait_rules`` for a trait group's. What a name means in a warehouse (tables, columns) is
``sync.rules.schema``'s business; turning rules into SQL is ``sync.rules.compiler``'s.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from sync.keys import key_problem

# Comparison operators of counts ("count = '>= 2'").
COUNT_OPERATORS = ("=", "!=", ">=", "<=", ">", "<")
# Operators of property filters, trait and computed-trait conditions.
OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "contains", "starts_with", "in", "exists")
Operator = Literal["=", "!=", ">", ">=", "<", "<=", "contains", "starts_with", "in", "exists"]
CountOperator = Literal["=", "!=", ">=", "<=", ">", "<"]
AGGREGATIONS = (
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "most_frequent",
    "first",
    "last",
    "unique_list",
    "unique_count",
)
Aggregation = Literal[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "most_frequent",
    "first",
    "last",
    "unique_list",
    "unique_count",
]
# Aggregations of a property's values (all but count).
PROPERTY_AGGREGATIONS = frozenset(AGGREGATIONS) - {"count"}
# Seconds per unit of a window ("30d").
WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_WINDOW = re.compile(r"^\s*(\d{1,6})\s*([mhdw])\s*$")
_COUNT = re.compile(r"^\s*(>=|<=|!=|=|>|<)\s*(\d{1,9})\s*$")
# Rule sets nest; a deeper one is surely a mistake (and would exhaust the SQL parser first).
MAX_DEPTH = 32
# Integers a rule compares with: the signed 64-bit range, BIGINT on every source database and
# what the drivers bind (SQLite's raises OverflowError beyond it). TOML says as much.
MIN_INTEGER, MAX_INTEGER = -(2**63), 2**63 - 1

Scalar = str | int | float | bool


class RuleProblems(ValueError):
    """Problems found in a rule set, each with its TOML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Window:
    """Events from ``newer_than`` seconds ago (None: any age) up to ``older_than`` seconds ago
    (0: now)."""

    newer_than: int | None = None
    older_than: int = 0


ALL_TIME = Window()


@dataclass(frozen=True)
class Filter:
    """``{ property = P, op = OP, value = V }`` on an event's property or a user's trait."""

    name: str
    op: Operator
    value: Scalar | tuple[Scalar, ...]


@dataclass(frozen=True)
class FollowUp:
    """A funnel's second step: ``event`` within ``within`` seconds after the first (None: any
    time after, up to now)."""

    event: str
    within: int | None
    where: tuple[Filter, ...]
    negated: bool  # not_followed_by


@dataclass(frozen=True)
class EventCondition:
    """Performed ``event`` (matching ``where``, and the funnel step if any) ``count`` times in
    ``window``."""

    event: str
    count_op: CountOperator
    count: int
    window: Window
    where: tuple[Filter, ...]
    follow_up: FollowUp | None = None


@dataclass(frozen=True)
class TraitCondition:
    """A column of the users table compared with a value."""

    test: Filter


@dataclass(frozen=True)
class ComputedTraitCondition:
    """A trait computed by a ``[[traits]]`` rule set, compared with a value."""

    test: Filter


@dataclass(frozen=True)
class MemberOf:
    """Is a member of another audience (its name or key)."""

    audience: str


@dataclass(frozen=True)
class All:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Any_:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    condition: Condition


Condition = EventCondition | TraitCondition | ComputedTraitCondition | MemberOf | All | Any_ | Not


@dataclass(frozen=True)
class TraitComputation:
    """One computed trait: ``aggregation`` of ``property`` (None for count) over ``event``."""

    aggregation: Aggregation
    event: str
    property: str | None
    window: Window
    where: tuple[Filter, ...]


# --- parsing ---------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def raise_any(self) -> None:
        if self.items:
            raise RuleProblems(self.items)


def _unknown_keys(found: dict[str, Any], allowed: tuple[str, ...], path: str, p: _Problems) -> None:
    for key in found:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f" (known: {', '.join(allowed)})"
            p.add(f"{path}.{key}", f"unknown key{hint}")


def parse_duration_text(value: Any) -> int:
    """Seconds of a window like ``"30d"`` (units m, h, d, w); raises ``ValueError``."""
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(
            f'not a time window: {value!r}; write a positive number and a unit, e.g. "30d", '
            '"12h", "90m", "2w"'
        )
    return int(match.group(1)) * WINDOW_UNITS[match.group(2)]


def _window(table: dict[str, Any], path: str, p: _Problems) -> Window:
    within, between = table.get("within"), table.get("between")
    if within is not None and between is not None:
        p.add(path, "give either within or between, not both")
        return ALL_TIME
    if within is not None:
        try:
            return Window(newer_than=parse_duration_text(within))
        except ValueError as exc:
            p.add(f"{path}.within", str(exc))
            return ALL_TIME
    if between is not None:
        if not isinstance(between, list) or len(between) != 2:
            p.add(
                f"{path}.between",
                'write two windows, the older bound first: between = ["90d", "30d"] (older '
                "than 30 days, newer than 90 days)",
            )
            return ALL_TIME
        try:
            newer, older = (parse_duration_text(b) for b in between)
        except ValueError as exc:
            p.add(f"{path}.between", str(exc))
            return ALL_TIME
        if newer <= older:
            p.add(
                f"{path}.between",
                f"the first window ({between[0]}) must be longer than the second "
                f'({between[1]}): between = ["{between[1]}", "{between[0]}"]?',
            )
            return ALL_TIME
        return Window(newer_than=newer, older_than=older)
    return ALL_TIME


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _number_problem(value: Any) -> str | None:
    """Why ``value``, a number, is one the source databases cannot compare alike, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        # NaN matched nobody on SQLite, everyone on PostgreSQL, failed on MariaDB.
        return (
            f"not a finite number: {value!r}; NaN and infinities compare differently on each "
            "database (a float beyond 1.8e308 is infinite)"
        )
    if isinstance(value, int) and not MIN_INTEGER <= value <= MAX_INTEGER:  # bools are 0, 1
        return (
            f"integer out of range: {value}; rules compare signed 64-bit integers "
            f"({MIN_INTEGER} to {MAX_INTEGER})"
        )
    return None


def _filter(table: Any, name_key: str, path: str, p: _Problems) -> Filter | None:
    """``{ <name_key> = NAME, op = OP, value = V }``; problems are added to ``p``."""
    if not isinstance(table, dict):
        p.add(path, f'write a table: {{ {name_key} = ..., op = "=", value = ... }}')
        return None
    _unknown_keys(table, (name_key, "op", "value"), path, p)
    name, op = table.get(name_key), table.get("op")
    value: Any = table.get("value")
    ok = True
    if not isinstance(name, str) or not name:
        p.add(f"{path}.{name_key}", "required: a non-empty name")
        ok = False
    if op not in OPERATORS:
        p.add(
            f"{path}.op",
            f"unknown operator {op!r}; write one of: {', '.join(OPERATORS)}"
            if op is not None
            else f"required: one of {', '.join(OPERATORS)}",
        )
        return None
    if "value" not in table:
        p.add(f"{path}.value", "required (exists takes true or false; in takes an array)")
        return None
    if op == "in":
        if not isinstance(value, list) or not value or not all(map(_scalar, value)):
            p.add(f"{path}.value", "in takes a non-empty array of text, numbers or booleans")
            return None
        problems = [(i, problem) for i, v in enumerate(value) if (problem := _number_problem(v))]
        for i, problem in problems:
            p.add(f"{path}.value[{i}]", problem)
        if problems:
            return None
        value = tuple(value)
    elif op == "exists":
        if not isinstance(value, bool):
            p.add(f"{path}.value", "exists takes true or false")
            return None
    elif op in ("contains", "starts_with"):
        if not isinstance(value, str) or not value:
            p.add(f"{path}.value", f"{op} takes a non-empty text")
            return None
    elif not _scalar(value):
        p.add(f"{path}.value", f"{op} takes a text, a number or a boolean")
        return None
    elif problem := _number_problem(value):
        p.add(f"{path}.value", problem)
        return None
    if not ok or not isinstance(name, str):
        return None
    return Filter(name, op, value)


def _filters(value: Any, path: str, p: _Problems) -> tuple[Filter, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        p.add(path, 'write an array: where = [ { property = "x", op = "=", value = 1 } ]')
        return ()
    parsed = (_filter(f, "property", f"{path}[{i}]", p) for i, f in enumerate(value))
    return tuple(f for f in parsed if f is not None)


def _event_name(table: dict[str, Any], path: str, p: _Problems) -> str:
    event = table.get("event")
    if not isinstance(event, str) or not event.strip():
        p.add(f"{path}.event", 'required: the event\'s name, e.g. "Order Completed"')
        return ""
    return event


_EVENT_KEYS = ("event", "count", "within", "between", "where", "followed_by", "not_followed_by")
_FOLLOW_KEYS = ("event", "within", "where")
CONDITION_KINDS = ("all", "any", "not", "event", "trait", "computed_trait", "member_of")


def _follow_up(table: dict[str, Any], path: str, p: _Problems) -> FollowUp | None:
    followed, not_followed = table.get("followed_by"), table.get("not_followed_by")
    if followed is None and not_followed is None:
        return None
    if followed is not None and not_followed is not None:
        p.add(path, "give either followed_by or not_followed_by, not both")
        return None
    key = "followed_by" if followed is not None else "not_followed_by"
    step = followed if followed is not None else not_followed
    where = f"{path}.{key}"
    if not isinstance(step, dict):
        p.add(where, f'write a table: {key} = {{ event = "...", within = "1d" }}')
        return None
    _unknown_keys(step, _FOLLOW_KEYS, where, p)
    within: int | None = None
    if step.get("within") is not None:
        try:
            within = parse_duration_text(step["within"])
        except ValueError as exc:
            p.add(f"{where}.within", str(exc))
    return FollowUp(
        event=_event_name(step, where, p),
        within=within,
        where=_filters(step.get("where"), f"{where}.where", p),
        negated=key == "not_followed_by",
    )


def _event_condition(table: dict[str, Any], path: str, p: _Problems) -> EventCondition:
    _unknown_keys(table, _EVENT_KEYS, path, p)
    count_op, count = ">=", 1
    if "count" in table:
        match = _COUNT.match(table["count"]) if isinstance(table["count"], str) else None
        if match is None:
            p.add(
                f"{path}.count",
                f"not a count: {table['count']!r}; write an operator and a number, e.g. "
                f'">= 2", "= 0", "< 5" (operators: {", ".join(COUNT_OPERATORS)})',
            )
        else:
            count_op, count = match.group(1), int(match.group(2))
    return EventCondition(
        event=_event_name(table, path, p),
        count_op=count_op,  # type: ignore[arg-type]
        count=count,
        window=_window(table, path, p),
        where=_filters(table.get("where"), f"{path}.where", p),
        follow_up=_follow_up(table, path, p),
    )


def _condition(value: Any, path: str, p: _Problems, depth: int = 0) -> Condition | None:
    if depth > MAX_DEPTH:
        p.add(path, f"rules nest deeper than {MAX_DEPTH} levels")
        return None
    if not isinstance(value, dict):
        p.add(path, 'write a condition table, e.g. { event = "Order Completed" }')
        return None
    kinds = [k for k in CONDITION_KINDS if k in value]
    if not kinds:
        _unknown_keys(value, CONDITION_KINDS, path, p)
        p.add(path, f"a condition needs one of: {', '.join(CONDITION_KINDS)}")
        return None
    if len(kinds) > 1 and not (set(kinds) <= {"event"}):
        p.add(path, f"one condition per table: found {', '.join(kinds)}; nest them in all = [...]")
        return None
    kind = kinds[0]
    if kind in ("all", "any"):
        _unknown_keys(value, (kind,), path, p)
        items = value[kind]
        if not isinstance(items, list) or not items:
            p.add(f"{path}.{kind}", "write a non-empty array of conditions")
            return None
        parsed = [
            _condition(item, f"{path}.{kind}[{i}]", p, depth + 1) for i, item in enumerate(items)
        ]
        conditions = tuple(c for c in parsed if c is not None)
        return All(conditions) if kind == "all" else Any_(conditions)
    if kind == "not":
        _unknown_keys(value, ("not",), path, p)
        inner = _condition(value["not"], f"{path}.not", p, depth + 1)
        return Not(inner) if inner is not None else None
    if kind == "event":
        return _event_condition(value, path, p)
    if kind == "member_of":
        _unknown_keys(value, ("member_of",), path, p)
        name = value["member_of"]
        if not isinstance(name, str) or not name:
            p.add(f"{path}.member_of", "write an audience's name or key")
            return None
        return MemberOf(name)
    test = _filter(value, kind, path, p)
    if test is None:
        return None
    return TraitCondition(test) if kind == "trait" else ComputedTraitCondition(test)


def parse_condition(value: Any, path: str) -> Condition:
    """An audience's ``rules`` table as a condition; raises ``RuleProblems``."""
    p = _Problems()
    condition = _condition(value, path, p)
    p.raise_any()
    assert condition is not None
    return condition


_TRAIT_KEYS = ("event", "property", "within", "between", "where")


def parse_trait_rules(value: Any, path: str) -> dict[str, TraitComputation]:
    """A trait group's ``rules`` table: trait name → computation; raises ``RuleProblems``."""
    p = _Problems()
    traits: dict[str, TraitComputation] = {}
    if not isinstance(value, dict) or not value:
        p.add(path, 'write one trait per key: orders = { count = { event = "Order Completed" } }')
        p.raise_any()
    for name, spec in value.items():
        where = f"{path}.{name}"
        # The name is the trait's key at every destination, not only a column label.
        if problem := key_problem(name):
            p.add(where, problem)
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            p.add(
                where,
                f'write one computation, e.g. {{ count = {{ event = "..." }} }} (one of '
                f"{', '.join(AGGREGATIONS)})",
            )
            continue
        ((aggregation, body),) = spec.items()
        if aggregation not in AGGREGATIONS:
            close = difflib.get_close_matches(aggregation, AGGREGATIONS, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            p.add(
                f"{where}.{aggregation}",
                f"unknown computation{hint} (known: {', '.join(AGGREGATIONS)})",
            )
            continue
        where = f"{where}.{aggregation}"
        if not isinstance(body, dict):
            p.add(where, 'write a table: { event = "...", property = "..." }')
            continue
        _unknown_keys(body, _TRAIT_KEYS, where, p)
        prop = body.get("property")
        if aggregation in PROPERTY_AGGREGATIONS and (not isinstance(prop, str) or not prop):
            p.add(f"{where}.property", f"required: {aggregation} is of an event property")
        if aggregation == "count" and prop is not None:
            p.add(f"{where}.property", "count counts events; remove property (or use unique_count)")
        traits[name] = TraitComputation(
            aggregation=aggregation,
            event=_event_name(body, where, p),
            property=prop if isinstance(prop, str) else None,
            window=_window(body, where, p),
            where=_filters(body.get("where"), f"{where}.where", p),
        )
    p.raise_any()
    return traits


def referenced_audiences(condition: Condition) -> list[str]:
    """The audiences a condition names in ``member_of`` (in order, with repeats)."""
    if isinstance(condition, MemberOf):
        return [condition.audience]
    if isinstance(condition, All | Any_):
        return [name for c in condition.conditions for name in referenced_audiences(c)]
    if isinstance(condition, Not):
        return referenced_audiences(condition.condition)
    return []


def referenced_computed_traits(condition: Condition) -> list[str]:
    """The computed traits a condition compares."""
    if isinstance(condition, ComputedTraitCondition):
        return [condition.test.name]
    if isinstance(condition, All | Any_):
        return [name for c in condition.conditions for name in referenced_computed_traits(c)]
    if isinstance(condition, Not):
        return referenced_computed_traits(condition.condition)
    return []
