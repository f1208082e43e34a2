"""Rules → one SQLAlchemy Core ``Select`` that runs on the source like an audience query.

An audience's result has ``user_id`` and ``anonymous_id`` (and its ``traits``, columns of the
users table); a trait group's has ``user_id`` and one column per trait. Conditions are
correlated subqueries on one row of ``profiles``: every user of the users table, and with
``include_anonymous`` every anonymous id seen (without a user id) in the event tables the rules
read. Every condition is two-valued (a missing value matches nothing), so ``not`` is the exact
complement. ``member_of`` and ``computed_trait`` compile the rules they name inline: the state
DB is another database, and inline they see the same "now" and the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Double,
    Select,
    String,
    TableClause,
    and_,
    case,
    cast,
    column,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    table,
    text,
    true,
    type_coerce,
    union,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from sync.rules.model import (
    All,
    Any_,
    ComputedTraitCondition,
    Condition,
    EventCondition,
    Filter,
    MemberOf,
    Not,
    RuleProblems,
    TraitComputation,
    TraitCondition,
    Window,
)
from sync.rules.schema import SchemaMapping, identifier_problem
from sync.rules.sql import Contains, JsonArrayAgg, SortedJsonArray, TimeShift, TimeValue

Predicate = ColumnElement[bool]


@dataclass(frozen=True)
class AudienceDefinition:
    """An audience as the compiler sees it: rules (``condition``) or SQL (``query``)."""

    name: str
    key: str
    source: str
    path: str  # its TOML path, e.g. audiences[2]
    condition: Condition | None = None
    query: str | None = None
    include_anonymous: bool = False
    traits: tuple[str, ...] = ()


@dataclass(frozen=True)
class TraitGroupDefinition:
    """A trait group as the compiler sees it: rules (``traits``) or SQL (``query``)."""

    name: str
    key: str
    source: str
    path: str
    traits: Mapping[str, TraitComputation] | None = None
    query: str | None = None


@dataclass(frozen=True)
class SourceRules:
    """What a source says about rules: its schema mapping and how to read "now"."""

    schema: SchemaMapping = field(default_factory=SchemaMapping)
    now_query: str | None = None


@dataclass(frozen=True)
class Catalog:
    """Every computation of the config, for ``member_of`` and ``computed_trait``."""

    audiences: tuple[AudienceDefinition, ...] = ()
    trait_groups: tuple[TraitGroupDefinition, ...] = ()

    def audience(self, name_or_key: str) -> AudienceDefinition | None:
        return next((a for a in self.audiences if name_or_key in (a.name, a.key)), None)

    def trait_group(self, name_or_key: str) -> TraitGroupDefinition | None:
        return next((g for g in self.trait_groups if name_or_key in (g.name, g.key)), None)

    def computed_traits(self, name: str) -> list[tuple[TraitGroupDefinition, str]]:
        """Trait groups defining a trait ``name`` (by rules or, as a column name, unknown)."""
        return [(g, name) for g in self.trait_groups if g.traits and name in g.traits]


class _Compilation:
    """One compilation: collects problems (with TOML paths) instead of stopping at the first."""

    def __init__(self, catalog: Catalog, source: str, rules: SourceRules) -> None:
        self.catalog = catalog
        self.source = source
        self.schema = rules.schema
        self.now_query = rules.now_query
        self.problems: list[str] = []
        self.aliases = _names()
        # Anonymous profiles are read from the event tables' anonymous id column.
        self.anonymous = False

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    # --- names -----------------------------------------------------------------------------

    def event_table(self, event: str, columns: list[str], path: str) -> FromClause:
        try:
            name = self.schema.event_table(event)
        except ValueError as exc:
            self.problem(path, str(exc))
            name = "invalid"
        s = self.schema
        ids = [s.user_id, *([s.anonymous_id] if self.anonymous else []), s.timestamp]
        t = table(name, *(column(c) for c in dict.fromkeys([*ids, *columns])), schema=s.db_schema)
        return t.alias(next(self.aliases))

    def property_column(self, written: str, path: str, what: str = "property") -> str:
        try:
            return self.schema.column(written, what)
        except ValueError as exc:
            self.problem(path, str(exc))
            return "invalid"

    def users(self, columns: list[str]) -> TableClause:
        s = self.schema
        return table(
            s.users_table,
            *(column(c) for c in dict.fromkeys([s.users_id, *columns])),
            schema=s.db_schema,
        )

    # --- time --------------------------------------------------------------------------------

    def now(self) -> ColumnElement[Any]:
        if self.now_query is None:
            return TimeValue(func.current_timestamp())
        # The operator's own SQL, like an audience query (never a rule's text).
        return TimeValue(literal_column(f"({self.now_query})"))

    def ago(self, seconds: int) -> ColumnElement[Any]:
        return TimeShift(self.now(), -seconds)

    def in_window(self, timestamp: ColumnElement[Any], window: Window) -> list[Predicate]:
        when = TimeValue(timestamp)
        found: list[Predicate] = []
        if window.newer_than is not None:
            found.append(when >= self.ago(window.newer_than))
        if window.older_than:
            found.append(when < self.ago(window.older_than))
        else:
            found.append(when <= self.now())
        return found


def _names() -> Iterator[str]:
    number = 0
    while True:
        number += 1
        yield f"r{number}"


_COMPARE: Mapping[str, Callable[[Any, Any], Predicate]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}


def filter_predicate(value_column: ColumnElement[Any], test: Filter) -> Predicate:
    """A filter as a predicate that is never NULL: a missing value matches no operator but
    ``exists = false``."""
    if test.op == "exists":
        return value_column.is_not(None) if test.value else value_column.is_(None)
    present = value_column.is_not(None)
    value = test.value
    if test.op == "in":
        assert isinstance(value, tuple)
        return and_(present, value_column.in_(list(value)))
    assert not isinstance(value, tuple)
    if test.op == "contains":
        return and_(present, Contains(value_column, literal(value)))
    if test.op == "starts_with":
        assert isinstance(value, str)
        head = func.substr(value_column, 1, literal(len(value)))
        return and_(present, head == literal(value))
    return and_(present, _COMPARE[test.op](value_column, literal(value)))


@dataclass
class _Profile:
    """The profile a condition is about: its id, and whether it is anonymous (None when only
    known users are profiles)."""

    pid: ColumnElement[Any]
    anon: ColumnElement[Any] | None

    def owns(self, events: FromClause, schema: SchemaMapping) -> Predicate:
        user_id = events.c[schema.user_id]
        if self.anon is None:
            return user_id == self.pid
        return or_(
            and_(self.anon == 0, user_id == self.pid),
            and_(
                self.anon == 1,
                user_id.is_(None),
                events.c[schema.anonymous_id] == self.pid,
            ),
        )

    def known(self) -> Predicate:
        return true() if self.anon is None else self.anon == 0


class _AudienceCompiler:
    def __init__(self, c: _Compilation) -> None:
        self.c = c

    def condition(
        self, condition: Condition, profile: _Profile, path: str, stack: tuple[str, ...]
    ) -> Predicate:
        if isinstance(condition, All):
            return and_(
                *(
                    self.condition(x, profile, f"{path}.all[{i}]", stack)
                    for i, x in enumerate(condition.conditions)
                )
            )
        if isinstance(condition, Any_):
            return or_(
                *(
                    self.condition(x, profile, f"{path}.any[{i}]", stack)
                    for i, x in enumerate(condition.conditions)
                )
            )
        if isinstance(condition, Not):
            return not_(self.condition(condition.condition, profile, f"{path}.not", stack))
        if isinstance(condition, EventCondition):
            return self.event(condition, profile, path)
        if isinstance(condition, TraitCondition):
            return self.trait(condition, profile, path)
        if isinstance(condition, ComputedTraitCondition):
            return self.computed_trait(condition, profile, path)
        return self.member_of(condition, profile, path, stack)

    def event(self, condition: EventCondition, profile: _Profile, path: str) -> Predicate:
        c, s = self.c, self.c.schema
        columns = [
            c.property_column(f.name, f"{path}.where[{i}].property")
            for i, f in enumerate(condition.where)
        ]
        events = c.event_table(condition.event, columns, f"{path}.event")
        found = [profile.owns(events, s), *c.in_window(events.c[s.timestamp], condition.window)]
        found += [
            filter_predicate(events.c[col], f)
            for col, f in zip(columns, condition.where, strict=True)
        ]
        step = condition.follow_up
        if step is not None:
            key = "not_followed_by" if step.negated else "followed_by"
            step_columns = [
                c.property_column(f.name, f"{path}.{key}.where[{i}].property")
                for i, f in enumerate(step.where)
            ]
            later = c.event_table(step.event, step_columns, f"{path}.{key}.event")
            first_at, then_at = events.c[s.timestamp], later.c[s.timestamp]
            follows = [
                profile.owns(later, s),
                TimeValue(then_at) > TimeValue(first_at),
                TimeValue(then_at) <= c.now(),
                *(
                    filter_predicate(later.c[col], f)
                    for col, f in zip(step_columns, step.where, strict=True)
                ),
            ]
            if step.within is not None:
                follows.append(TimeValue(then_at) <= TimeShift(first_at, step.within))
            followed = exists().where(*follows).correlate_except(later)
            if not step.negated:
                found.append(followed)
            else:
                found.append(not_(followed))
                if step.within is not None:  # only once the follow-up's time is up
                    found.append(TimeShift(first_at, step.within) <= c.now())
        op, n = condition.count_op, condition.count
        performed = exists().where(*found).correlate_except(events)
        if (op, n) in ((">=", 1), (">", 0), ("!=", 0)):
            return performed
        if (op, n) in (("=", 0), ("<", 1), ("<=", 0)):
            return not_(performed)
        counted = (
            select(func.count()).select_from(events).where(*found).correlate_except(events)
        ).scalar_subquery()
        return _COMPARE[op](counted, literal(n))

    def trait(self, condition: TraitCondition, profile: _Profile, path: str) -> Predicate:
        s = self.c.schema
        name = self.c.property_column(condition.test.name, f"{path}.trait", "trait")
        users = self.c.users([name]).alias(next(self.c.aliases))
        return (
            exists()
            .where(
                profile.known(),
                users.c[s.users_id] == profile.pid,
                filter_predicate(users.c[name], condition.test),
            )
            .correlate_except(users)
        )

    def computed_trait(
        self, condition: ComputedTraitCondition, profile: _Profile, path: str
    ) -> Predicate:
        name = condition.test.name
        defined = self.c.catalog.computed_traits(name)
        if not defined:
            self.c.problem(
                f"{path}.computed_trait",
                f'no trait group defines a trait "{name}" '
                "with rules; define it under [traits.rules]",
            )
            return false()
        if len(defined) > 1:
            groups = ", ".join(f'"{g.name}"' for g, _ in defined)
            self.c.problem(
                f"{path}.computed_trait",
                f'"{name}" is defined by several trait groups ({groups}); rename one',
            )
            return false()
        group, _ = defined[0]
        if group.source != self.c.source:
            self.c.problem(
                f"{path}.computed_trait",
                f'"{name}" is computed on source '
                f'"{group.source}", this audience runs on "{self.c.source}"',
            )
            return false()
        assert group.traits is not None
        values = (
            _TraitCompiler(self.c)
            .value_table(group.traits[name], f"{group.path}.rules.{name}")
            .alias(next(self.c.aliases))
        )
        return (
            exists()
            .where(
                profile.known(),
                values.c.owner == profile.pid,
                filter_predicate(values.c.value, condition.test),
            )
            .correlate_except(values)
        )

    def member_of(
        self, condition: MemberOf, profile: _Profile, path: str, stack: tuple[str, ...]
    ) -> Predicate:
        where = f"{path}.member_of"
        other = self.c.catalog.audience(condition.audience)
        if other is None:
            hint = (
                " (it is a trait group)" if self.c.catalog.trait_group(condition.audience) else ""
            )
            self.c.problem(where, f'no audience named "{condition.audience}"{hint}')
            return false()
        if other.name in stack:
            cycle = " → ".join([*stack[stack.index(other.name) :], other.name])
            self.c.problem(where, f"audiences depend on each other in a cycle: {cycle}")
            return false()
        if other.source != self.c.source:
            self.c.problem(
                where,
                f'audience "{other.name}" runs on source "{other.source}", '
                f'this one on "{self.c.source}": member_of needs one source',
            )
            return false()
        if other.condition is None:
            assert other.query is not None
            members = text(other.query).columns(column("user_id")).subquery(next(self.c.aliases))
            # Without its NULL ids: `NOT (x IN (… NULL …))` is NULL, never true, so one row
            # without a user_id would have emptied every "not a member of" audience.
            # As text: the SQL may return integer ids, which the rules compare as text.
            ids = select(cast(members.c.user_id, String)).where(members.c.user_id.is_not(None))
            return and_(profile.known(), profile.pid.in_(ids))
        inner = self.condition(
            other.condition, profile, f"{other.path}.rules", (*stack, other.name)
        )
        return inner if other.include_anonymous else and_(profile.known(), inner)


def _events_read(
    condition: Condition, catalog: Catalog, seen: frozenset[str] = frozenset()
) -> list[str]:
    """Events whose tables an audience's rules read (through member_of too): where anonymous
    profiles are found."""
    if isinstance(condition, EventCondition):
        step = condition.follow_up
        return [condition.event, *([step.event] if step else [])]
    if isinstance(condition, All | Any_):
        return [e for x in condition.conditions for e in _events_read(x, catalog, seen)]
    if isinstance(condition, Not):
        return _events_read(condition.condition, catalog, seen)
    if isinstance(condition, MemberOf):
        other = catalog.audience(condition.audience)
        if other is None or other.condition is None or other.name in seen:
            return []
        return _events_read(other.condition, catalog, seen | {other.name})
    return []


class _TraitCompiler:
    def __init__(self, c: _Compilation) -> None:
        self.c = c

    def value_table(self, trait: TraitComputation, path: str) -> Select[Any]:
        """``(owner, value)``: one row per user with a value."""
        c, s = self.c, self.c.schema
        columns = [
            c.property_column(f.name, f"{path}.where[{i}].property")
            for i, f in enumerate(trait.where)
        ]
        prop = c.property_column(trait.property, f"{path}.property") if trait.property else None
        events = c.event_table(trait.event, [*columns, *([prop] if prop else [])], f"{path}.event")
        owner = events.c[s.user_id]
        found = [owner.is_not(None), *c.in_window(events.c[s.timestamp], trait.window)]
        found += [
            filter_predicate(events.c[col], f) for col, f in zip(columns, trait.where, strict=True)
        ]
        if prop is None:
            return (
                select(owner.label("owner"), func.count().label("value"))
                .where(*found)
                .group_by(owner)
            )
        value = events.c[prop]
        found.append(value.is_not(None))
        kind = trait.aggregation
        simple: dict[str, Callable[[Any], Any]] = {
            "sum": func.sum,
            "min": func.min,
            "max": func.max,
            "avg": lambda v: func.avg(cast(v, Double)),
            "unique_count": lambda v: func.count(v.distinct()),
        }
        if kind in simple:
            return (
                select(owner.label("owner"), simple[kind](value).label("value"))
                .where(*found)
                .group_by(owner)
            )
        if kind == "unique_list":
            distinct = (
                select(owner.label("owner"), value.label("value"))
                .where(*found)
                .group_by(owner, value)
                .subquery(next(c.aliases))
            )
            listed = type_coerce(JsonArrayAgg(distinct.c.value), SortedJsonArray)
            return select(distinct.c.owner, listed.label("value")).group_by(distinct.c.owner)
        if kind == "most_frequent":
            counted = (
                select(owner.label("owner"), value.label("value"), func.count().label("times"))
                .where(*found)
                .group_by(owner, value)
                .subquery(next(c.aliases))
            )
            order = (counted.c.times.desc(), counted.c.value.asc())
            ranked = select(
                counted.c.owner,
                counted.c.value,
                func.row_number()
                .over(partition_by=counted.c.owner, order_by=order)
                .label("position"),
            ).subquery(next(c.aliases))
        else:  # first, last: by event time, ties to the smallest value
            when = TimeValue(events.c[s.timestamp])
            by_time = when.asc() if kind == "first" else when.desc()
            ranked = (
                select(
                    owner.label("owner"),
                    value.label("value"),
                    func.row_number()
                    .over(partition_by=owner, order_by=(by_time, value.asc()))
                    .label("position"),
                )
                .where(*found)
                .subquery(next(c.aliases))
            )
        return select(ranked.c.owner, ranked.c.value).where(ranked.c.position == 1)


def _raise(c: _Compilation) -> None:
    if c.problems:
        raise RuleProblems(list(dict.fromkeys(c.problems)))


def compile_audience(
    audience: AudienceDefinition, catalog: Catalog, rules: SourceRules
) -> Select[Any]:
    """The audience's rules as one Select of ``user_id``, ``anonymous_id`` and its traits;
    raises ``RuleProblems`` (with TOML paths)."""
    assert audience.condition is not None
    c = _Compilation(catalog, audience.source, rules)
    c.anonymous = audience.include_anonymous
    s = c.schema
    users = c.users([])
    known = select(users.c[s.users_id].label("pid"), literal(0).label("anon"))
    if audience.include_anonymous:
        parts = [known]
        for event in dict.fromkeys(_events_read(audience.condition, catalog)):
            events = c.event_table(event, [], f"{audience.path}.rules")
            parts.append(
                select(events.c[s.anonymous_id], literal(1)).where(
                    events.c[s.user_id].is_(None), events.c[s.anonymous_id].is_not(None)
                )
            )
        profiles = union(*parts).subquery("profiles")
    else:
        profiles = known.subquery("profiles")
    anonymous = profiles.c.anon if audience.include_anonymous else None
    profile = _Profile(profiles.c.pid, anonymous)
    predicate = _AudienceCompiler(c).condition(
        audience.condition, profile, f"{audience.path}.rules", (audience.name,)
    )
    trait_columns = [
        c.property_column(t, f"{audience.path}.traits[{i}]", "trait")
        for i, t in enumerate(audience.traits)
    ]
    _raise(c)
    if anonymous is None:
        ids: list[Any] = [profiles.c.pid.label("user_id"), null().label("anonymous_id")]
    else:
        ids = [
            case((anonymous == 0, profiles.c.pid)).label("user_id"),
            case((anonymous == 1, profiles.c.pid)).label("anonymous_id"),
        ]
    statement = select(*ids).select_from(profiles)
    if trait_columns:
        profile_users = c.users(trait_columns).alias("profile_users")
        statement = statement.outerjoin(
            profile_users,
            and_(profile.known(), profile_users.c[s.users_id] == profiles.c.pid),
        ).add_columns(
            *(
                profile_users.c[col].label(name)
                for col, name in zip(trait_columns, audience.traits, strict=True)
            )
        )
    return statement.where(predicate)


def compile_trait_group(
    group: TraitGroupDefinition, catalog: Catalog, rules: SourceRules
) -> Select[Any]:
    """The trait group's rules as one Select of ``user_id`` and one column per trait (users
    with at least one value); raises ``RuleProblems``."""
    assert group.traits is not None
    c = _Compilation(catalog, group.source, rules)
    s = c.schema
    for name in group.traits:
        if (problem := identifier_problem(name)) or name in ("user_id", "anonymous_id"):
            c.problem(
                f"{group.path}.rules.{name}",
                problem or f'"{name}" is the member id, not a trait; rename it',
            )
    users = c.users([]).alias("profiles")
    joined: FromClause = users
    values = []
    compiler = _TraitCompiler(c)
    for name in sorted(group.traits):
        value_table = compiler.value_table(
            group.traits[name], f"{group.path}.rules.{name}"
        ).subquery(next(c.aliases))
        joined = joined.outerjoin(value_table, value_table.c.owner == users.c[s.users_id])
        values.append(value_table.c.value.label(name))
    _raise(c)
    return (
        select(users.c[s.users_id].label("user_id"), *values)
        .select_from(joined)
        .where(or_(*(v.is_not(None) for v in [x.element for x in values])))
    )
