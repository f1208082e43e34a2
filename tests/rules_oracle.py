"""The rule language evaluated in plain Python over a generated warehouse's rows: the
independent answer the compiled SQL is checked against (README "Rules" is its specification).
It shares only the parsed rule objects with ``sync.rules``, no SQL and no compiler code."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sync.rules.model import (
    All,
    Any_,
    ComputedTraitCondition,
    Condition,
    EventCondition,
    Filter,
    MemberOf,
    Not,
    TraitComputation,
    TraitCondition,
    Window,
)
from tests.warehouse_gen import Warehouse

Profile = tuple[str, bool]  # (id, anonymous)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def matches(value: Any, test: Filter) -> bool:
    if test.op == "exists":
        return (value is not None) == test.value
    if value is None:
        return False
    if test.op == "in":
        assert isinstance(test.value, tuple)
        return value in test.value
    if test.op == "contains":
        return str(test.value) in value
    if test.op == "starts_with":
        return bool(value.startswith(test.value))
    return _OPS[test.op](value, test.value)


def snake(name: str) -> str:
    return name.lower().replace(" ", "_")


class Oracle:
    """Evaluates rules at ``now`` over a warehouse's rows."""

    def __init__(
        self,
        warehouse: Warehouse,
        now: datetime,
        audiences: Mapping[str, tuple[Condition, bool]] | None = None,
        traits: Mapping[str, TraitComputation] | None = None,
    ) -> None:
        self.w = warehouse
        self.now = now
        self.audiences = audiences or {}  # name → (condition, include_anonymous)
        self.traits = traits or {}
        self._trait_cache: dict[str, dict[str, Any]] = {}
        # (event, owner) → rows, where owner is a profile.
        self.rows: dict[tuple[str, Profile], list[dict[str, Any]]] = {}
        for event, rows in warehouse.events.items():
            for row in rows:
                if row["user_id"] is not None:
                    owner = (row["user_id"], False)
                elif row["anonymous_id"] is not None:
                    owner = (row["anonymous_id"], True)
                else:
                    continue
                self.rows.setdefault((event, owner), []).append(row)

    def _in_window(self, at: datetime, window: Window) -> bool:
        if window.newer_than is not None and at < self.now - timedelta(seconds=window.newer_than):
            return False
        if window.older_than:
            return at < self.now - timedelta(seconds=window.older_than)
        return at <= self.now

    def _where(self, row: Mapping[str, Any], filters: Iterable[Filter]) -> bool:
        return all(matches(row.get(snake(f.name)), f) for f in filters)

    def profiles(
        self, include_anonymous: bool, condition: Condition | None = None
    ) -> list[Profile]:
        found = [(user_id, False) for user_id in self.w.users]
        if include_anonymous:
            events = set(self._events(condition)) if condition is not None else set()
            found += sorted(
                {
                    (row["anonymous_id"], True)
                    for event in events
                    for row in self.w.events.get(event, [])
                    if row["user_id"] is None and row["anonymous_id"] is not None
                }
            )
        return found

    def _events(self, condition: Condition, seen: frozenset[str] = frozenset()) -> list[str]:
        if isinstance(condition, EventCondition):
            step = condition.follow_up
            return [condition.event, *([step.event] if step else [])]
        if isinstance(condition, All | Any_):
            return [e for c in condition.conditions for e in self._events(c, seen)]
        if isinstance(condition, Not):
            return self._events(condition.condition, seen)
        if isinstance(condition, MemberOf) and condition.audience not in seen:
            inner, _ = self.audiences[condition.audience]
            return self._events(inner, seen | {condition.audience})
        return []

    def members(self, condition: Condition, include_anonymous: bool) -> set[Profile]:
        return {p for p in self.profiles(include_anonymous, condition) if self.holds(condition, p)}

    def holds(self, condition: Condition, profile: Profile) -> bool:
        if isinstance(condition, All):
            return all(self.holds(c, profile) for c in condition.conditions)
        if isinstance(condition, Any_):
            return any(self.holds(c, profile) for c in condition.conditions)
        if isinstance(condition, Not):
            return not self.holds(condition.condition, profile)
        if isinstance(condition, TraitCondition):
            user_id, anonymous = profile
            if anonymous or user_id not in self.w.users:
                return False
            return matches(self.w.users[user_id].get(snake(condition.test.name)), condition.test)
        if isinstance(condition, ComputedTraitCondition):
            user_id, anonymous = profile
            values = self.trait_values(condition.test.name)
            return not anonymous and user_id in values and matches(values[user_id], condition.test)
        if isinstance(condition, MemberOf):
            inner, include_anonymous = self.audiences[condition.audience]
            if profile[1] and not include_anonymous:
                return False
            return self.holds(inner, profile)
        assert isinstance(condition, EventCondition)
        return self._event(condition, profile)

    def _event(self, condition: EventCondition, profile: Profile) -> bool:
        count = 0
        step = condition.follow_up
        later_rows = self.rows.get((step.event, profile), []) if step else []
        for row in self.rows.get((condition.event, profile), []):
            if not self._in_window(row["timestamp"], condition.window):
                continue
            if not self._where(row, condition.where):
                continue
            if step is not None:
                start = row["timestamp"]
                limit = start + timedelta(seconds=step.within) if step.within else None
                followed = any(
                    start < r["timestamp"] <= self.now
                    and (limit is None or r["timestamp"] <= limit)
                    and self._where(r, step.where)
                    for r in later_rows
                )
                if step.negated:
                    if followed or (limit is not None and limit > self.now):
                        continue
                elif not followed:
                    continue
            count += 1
        return _OPS[condition.count_op](count, condition.count)

    def trait_values(self, name: str) -> dict[str, Any]:
        """User id → the value of computed trait ``name`` (users without one left out)."""
        if name not in self._trait_cache:
            self._trait_cache[name] = self.compute(self.traits[name])
        return self._trait_cache[name]

    def compute(self, trait: TraitComputation) -> dict[str, Any]:
        found: dict[str, Any] = {}
        prop = snake(trait.property) if trait.property else None
        for user_id in self.w.users:
            rows = [
                row
                for row in self.rows.get((trait.event, (user_id, False)), [])
                if self._in_window(row["timestamp"], trait.window)
                and self._where(row, trait.where)
                and (prop is None or row[prop] is not None)
            ]
            if not rows:
                continue
            values = [row[prop] for row in rows] if prop else []
            kind = trait.aggregation
            if kind == "count":
                found[user_id] = len(rows)
            elif kind == "sum":
                found[user_id] = sum(values)
            elif kind == "avg":
                found[user_id] = sum(values) / len(values)
            elif kind == "min":
                found[user_id] = min(values)
            elif kind == "max":
                found[user_id] = max(values)
            elif kind == "unique_count":
                found[user_id] = len(set(values))
            elif kind == "unique_list":
                found[user_id] = sorted(set(values))
            elif kind == "most_frequent":
                counts = Counter(values)
                found[user_id] = min(counts, key=lambda v: (-counts[v], v))
            else:
                assert prop is not None
                if kind == "first":
                    best = min(rows, key=lambda r: (r["timestamp"], r[prop]))
                else:
                    best = min(rows, key=lambda r: (-r["timestamp"].timestamp(), r[prop]))
                found[user_id] = best[prop]
        return found
