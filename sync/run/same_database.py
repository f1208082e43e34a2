"""The same-database path: a query that runs on the state database is staged with one
``INSERT … SELECT``, no row passing through Python.

One rule for ids and traits on every path (README "How a sync works"): this path stages in SQL
only queries whose ids and traits it renders exactly as the streaming path's ``validate_row``
(a trait group's values: ``validate_trait_row``) does — text, integers, booleans (PostgreSQL)
and NULL. A query with any other value (a float, a
NUMERIC, a date, bytes, JSON, text with NUL or not UTF-8) is left to the streaming path, whole:
:func:`stage_in_database` returns None and the caller streams it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    LargeBinary,
    String,
    Text,
    and_,
    case,
    cast,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from sync.errors import SourceError
from sync.run.stage_table import count_staged
from sync.run.staging import (
    MAX_INVALID_SAMPLES,
    HeldRow,
    SnapshotStats,
    invalid_sample,
    query_problem,
    source_error,
    validate_row,
    validate_trait_row,
)
from sync.run.trait_values import MAX_TRAIT_ROW_BYTES, TraitColumns
from sync.state.db import insert_ignoring_duplicates
from sync.state.tables import MAX_MEMBER_ID_LENGTH

# The characters Python's str.isspace() accepts: an id made only of them is blank (absent) on
# both paths, as ``str.strip()`` decides on the streaming path.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Control characters an id may not hold (NUL: SQLite text only; such a query is streamed).
FORBIDDEN_IN_ID = "\n\r\t"
# PostgreSQL type OIDs (pg_type) whose values this path renders as the streaming path does:
# text, varchar, int2, int4, int8 for ids; booleans too for traits.
PG_TEXT_OIDS = frozenset({25, 1043})
PG_INTEGER_OIDS = frozenset({20, 21, 23})
PG_BOOL_OID = 16
# SQLite: a GLOB matching text with a character outside ASCII (then checked for valid UTF-8).
NON_ASCII_GLOB = "*[^\x01-\x7f]*"
UTF8_CHECK_FUNCTION = "audience_sync_is_utf8"


def _is_utf8(raw: bytes | None) -> int:
    if raw is None:
        return 1
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return 1


def _sqlite_plain(value: Any) -> ColumnElement[bool]:
    """SQLite stores any type in any column: a value is plain when it is NULL, an integer, or
    UTF-8 text without NUL."""
    kind = func.typeof(value)
    raw = cast(value, LargeBinary)
    utf8 = or_(
        ~value.op("GLOB")(literal(NON_ASCII_GLOB)),
        getattr(func, UTF8_CHECK_FUNCTION)(raw) == 1,
    )
    no_nul = func.instr(raw, literal(b"\x00", LargeBinary)) == 0
    return or_(kind.in_(("null", "integer")), and_(kind == "text", no_nul, utf8))


def _postgres_plain(types: dict[str, Any], ids: Sequence[str], traits: Sequence[str]) -> bool:
    """PostgreSQL columns have one type: the query is plain when every id column is text or an
    integer and every trait column is also possibly a boolean."""
    id_types = PG_TEXT_OIDS | PG_INTEGER_OIDS
    return all(types.get(c) in id_types for c in ids) and all(
        types.get(t) in id_types | {PG_BOOL_OID} for t in traits
    )


class _Rows:
    """The id and validity expressions over a query aliased ``alias``."""

    def __init__(self, dialect: str, alias: str, columns: Sequence[str]) -> None:
        self.dialect, self.alias, self.columns = dialect, alias, columns
        user, user_present, user_clean = self.id_parts("user_id")
        anon, _anon_present, anon_clean = self.id_parts("anonymous_id")
        self.user, self.anon, self.user_present = user, anon, user_present
        self.anon_kept = and_(user_present, anon_clean)
        self.valid = or_(user_clean, and_(~user_present, anon_clean))

    def column(self, name: str) -> Any:
        return literal_column(f"{self.alias}.{name}")

    def id_parts(self, name: str) -> tuple[Any, Any, Any]:
        """The id as text, whether it is present (not NULL or blank), and whether it is
        usable — as ``staging.normalize_id`` decides for text and integers."""
        if name not in self.columns:
            return null(), literal(False), literal(False)
        value = cast(self.column(name), Text)
        trim = func.btrim if self.dialect == "postgresql" else func.trim
        position = func.strpos if self.dialect == "postgresql" else func.instr
        present = and_(value.is_not(None), trim(value, literal(WHITESPACE)) != "")
        clean = and_(
            present,
            func.length(value) <= MAX_MEMBER_ID_LENGTH,
            *[position(value, literal(c)) == 0 for c in FORBIDDEN_IN_ID],
        )
        return value, present, clean


def _traits_json(dialect: str, rows: _Rows, traits: Sequence[str]) -> Any:
    if not traits:
        return null()
    builder = func.json_build_object if dialect == "postgresql" else func.json_object
    pairs: list[Any] = []
    for name in traits:
        pairs += [literal(name), rows.column(name)]
    return builder(*pairs)


def _value_json(dialect: str, rows: _Rows, names: Sequence[str]) -> Any:
    """A trait group's row as the streaming path's canonical JSON text (``row_object``): sorted
    names, no spaces; each value rendered by the database exactly as Python's JSON encoder
    does for text, integers, booleans and NULL (the only values this path takes)."""
    parts: list[Any] = []
    for index, name in enumerate(sorted(names)):
        column = rows.column(name)
        rendered: Any
        if dialect == "postgresql":
            rendered = func.coalesce(cast(func.to_json(column), Text), literal("null"))
        else:
            rendered = case(
                (column.is_(None), literal("null")),
                (func.typeof(column) == "integer", cast(column, Text)),
                else_=func.json_quote(column),
            )
        parts += [literal(("{" if index == 0 else ",") + f'"{name}":'), rendered]
    parts.append(literal("}"))
    return func.concat(*parts) if dialect == "postgresql" else _sqlite_concat(parts)


def _sqlite_concat(parts: list[Any]) -> Any:
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.op("||")(part)
    return joined


def _bytes(dialect: str, value: Any) -> Any:
    """The UTF-8 length of a text expression."""
    if dialect == "postgresql":
        return func.octet_length(value)
    return func.length(cast(value, LargeBinary))


def subquery_text(query: str) -> str:
    """The audience query as the body of a subquery: without its trailing semicolons and
    comment lines, and ending with a newline (a comment at the end of its last line would
    otherwise swallow the closing parenthesis)."""
    lines = query.strip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].strip().startswith("--")):
        lines.pop()
    body = "\n".join(lines).rstrip().rstrip(";")
    return f"{body}\n"


def stage_in_database(
    state: Connection,
    run_id: int,
    *,
    audience: str,
    source_name: str,
    query: str,
    traits: Sequence[str],
    trait_columns: TraitColumns | None = None,
) -> SnapshotStats | None:
    """Stage with one ``INSERT … SELECT`` when the source is the state database itself; None
    when the query holds values only the streaming path renders (the caller streams it).
    ``audience``: how errors name the computation (``ComputationConfig.title``).
    ``trait_columns``: the query is a trait group's; its rows are staged as values."""
    # A little over 60 lines: probe, count and insert share one error boundary (every
    # failure here is the query's, reported as a source error).
    dialect = state.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        return None  # MySQL/MariaDB: no exact SQL rendering written; the streaming path
    body = subquery_text(query)
    try:
        probe = state.execute(text(f"SELECT * FROM ({body}) AS q WHERE 1 = 0"))
        columns = list(probe.keys())
        types = {c: d[1] for c, d in zip(columns, probe.cursor.description or [], strict=False)}
        probe.close()
        if problem := query_problem(columns, traits):
            raise SourceError(f"{audience}: the query {problem}")
        names: list[str] = []
        if trait_columns is not None:
            names = [name for name, _ in trait_columns.indexes(columns)]  # raises if unusable
            traits = names
        if len(set(columns)) < len(columns):
            return None  # a column named twice is ambiguous in SQL; streaming takes the first
        ids = [c for c in ("user_id", "anonymous_id") if c in columns]
        if dialect == "postgresql" and not _postgres_plain(types, ids, traits):
            return None
        source = text(body).columns().subquery("q")
        rows = _Rows(dialect, "q", columns)
        value: Any = null()
        totals = [func.count(), func.sum(case((rows.valid, 1), else_=0))]
        if trait_columns is not None:
            # A row over the size limit is held: staged without values, its member keeps
            # what it has (as the streaming path's HeldRow).
            rendered = _value_json(dialect, rows, names)
            fits = _bytes(dialect, rendered) <= MAX_TRAIT_ROW_BYTES
            value = case((fits, rendered), else_=null())
            totals.append(func.sum(case((and_(rows.valid, ~fits), 1), else_=0)))
        if dialect == "sqlite":
            state.connection.dbapi_connection.create_function(  # type: ignore[union-attr]
                UTF8_CHECK_FUNCTION, 1, _is_utf8, deterministic=True
            )
            plain = and_(*[_sqlite_plain(rows.column(c)) for c in (*ids, *traits)])
            totals.append(func.sum(case((plain, 0), else_=1)))
        counts = state.execute(select(*totals).select_from(source)).one()
        if dialect == "sqlite" and counts[-1]:
            return None
        snapshot = (
            select(
                literal(run_id).label("run_id"),
                case((rows.user_present, "user"), else_="anonymous").label("id_kind"),
                cast(case((rows.user_present, rows.user), else_=rows.anon), String).label(
                    "member_id"
                ),
                case((rows.anon_kept, rows.anon), else_=null()).label("anonymous_id"),
                (null() if names else _traits_json(dialect, rows, traits)).label("traits"),
                value.label("value"),
            )
            .select_from(source)
            .where(rows.valid)
        )
        state.execute(
            insert_ignoring_duplicates(state).from_select(
                ["run_id", "id_kind", "member_id", "anonymous_id", "traits", "value"], snapshot
            )
        )
        stats = SnapshotStats(rows=int(counts[0]), staged=count_staged(state, run_id))
        stats.trait_names = names
        stats.held = int(counts[2] or 0) if names else 0
        stats.invalid = stats.rows - int(counts[1] or 0) + stats.held
        if stats.invalid:
            stats.samples = _samples(state, dialect, body, columns, traits, names)
    except SQLAlchemyError as exc:
        raise source_error(audience, source_name, exc) from None
    stats.count_duplicates()
    return stats


def _samples(
    state: Connection,
    dialect: str,
    body: str,
    columns: list[str],
    traits: Sequence[str],
    values: Sequence[str],
) -> list[str]:
    """The first invalid rows, described by the streaming path's own validation (so both paths
    give the same reasons), numbered by their position in the result. ``values``: a trait
    group's traits (its rows are validated as values)."""
    numbered = text(f"SELECT row_number() OVER () AS audience_sync_row, q.* FROM ({body}) AS q")
    rows = _Rows(dialect, "r", columns)
    invalid = ~rows.valid
    if values:
        value = _value_json(dialect, rows, values)
        invalid = or_(invalid, _bytes(dialect, value) > MAX_TRAIT_ROW_BYTES)
    wanted = ["audience_sync_row", *columns]
    found = state.execute(
        select(*[rows.column(c) for c in wanted])
        .select_from(numbered.columns().subquery("r"))
        .where(invalid)
        .limit(MAX_INVALID_SAMPLES)
    ).all()
    user = columns.index("user_id") + 1 if "user_id" in columns else None
    anon = columns.index("anonymous_id") + 1 if "anonymous_id" in columns else None
    trait_indexes = [(t, columns.index(t) + 1) for t in dict.fromkeys(traits)]
    validate = validate_trait_row if values else validate_row
    if values:
        trait_indexes.sort()
    samples = []
    for row in found:
        reason = validate(row, user, anon, trait_indexes)
        if isinstance(reason, HeldRow):
            reason = reason.reason
        samples.append(invalid_sample(int(row[0]), reason if isinstance(reason, str) else "id"))
    return samples
