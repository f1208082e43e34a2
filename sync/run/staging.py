"""Compute: stream an audience query into the staging table, validating every row.

Rows travel in chunks (server-side cursors where the driver has them), never as a whole set in
Python memory. When the source is the state database itself, the snapshot is staged with one
``INSERT … SELECT`` and no row passes through Python.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from json.encoder import encode_basestring
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    delete,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from sync.errors import SourceError, driver_reason
from sync.run.sources import Unconvertible, conversion_failed, tolerate_unconvertible
from sync.run.stage_table import count_staged, insert_staged
from sync.run.trait_values import InvalidValue, TraitColumns, row_object
from sync.state.db import insert_ignoring_duplicates
from sync.state.tables import MAX_MEMBER_ID_LENGTH, STAGED

# Invalid rows kept as examples on the run (the rest are only counted).
MAX_INVALID_SAMPLES = 5
# Characters that make an id unusable as a userId (they break logs, CSV exports and lookups),
# and lone surrogates: bytes a source's text was decoded around (not valid UTF-8).
_FORBIDDEN_ID = re.compile("[\n\r\t\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class SnapshotStats:
    """What compute found in the audience query's result."""

    rows: int = 0
    staged: int = 0
    invalid: int = 0
    duplicates: int = 0
    samples: list[str] = field(default_factory=list)
    # A trait group's traits (its query's columns but the ids), sorted.
    trait_names: list[str] = field(default_factory=list)
    # Invalid rows of a trait group whose ids are usable: staged without values, so that the
    # member keeps what it has (counted in ``invalid`` and in ``staged``).
    held: int = 0

    def count_duplicates(self) -> None:
        """Rows that named a member staged already (the first row staged wins)."""
        self.duplicates = self.rows - self.invalid - (self.staged - self.held)

    def add_invalid(self, description: str) -> None:
        """Count one invalid row, keeping a few as examples."""
        self.invalid += 1
        if len(self.samples) < MAX_INVALID_SAMPLES:
            self.samples.append(description)


def invalid_sample(row_number: int, reason: str) -> str:
    """How an invalid row is described on the run (the same words on every staging path)."""
    return f"row {row_number}: {reason}"


def query_problem(columns: Sequence[str], traits: Sequence[str]) -> str | None:
    names = set(columns)
    if "user_id" not in names and "anonymous_id" not in names:
        return (
            f"returns the columns {', '.join(columns) or '(none)'}; it needs a user_id column "
            "(or anonymous_id)"
        )
    missing = [t for t in traits if t not in names]
    if missing:
        return (
            f"lists traits {', '.join(missing)} that are not columns of its result "
            f"(columns: {', '.join(columns)})"
        )
    return None


def json_value(value: Any) -> Any:
    """A trait value as JSON: dates as ISO-8601, decimals as numbers, bytes as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def normalize_id(value: Any) -> tuple[str | None, str | None]:
    """Return ``(id, None)`` for a usable id, ``(None, None)`` when absent, or
    ``(None, reason)`` when present but unusable.

    The one rule for ids on every path (the same-database path renders the same in SQL):
    text is kept as it is; NULL, empty or whitespace-only text is absent; integers, and
    integral floats and decimals (``42.0``, ``7.00``), are their integer text; other numbers
    (fractions, NaN, infinities) and booleans are invalid; so is text over
    ``MAX_MEMBER_ID_LENGTH`` characters, with a newline, tab or NUL, or not valid UTF-8.
    """
    if (
        type(value) is str  # the common case, checked in one pass
        and 0 < len(value) <= MAX_MEMBER_ID_LENGTH
        and not value.isspace()
        and _FORBIDDEN_ID.search(value) is None
    ):
        return value, None
    if value is None:
        return None, None
    if isinstance(value, bool):
        return None, f"id {value!r} is a boolean, not text"
    if isinstance(value, int):
        text_id = str(value)
    elif isinstance(value, float | decimal.Decimal):
        if not _is_whole_number(value):
            return None, f"id {value} is not a whole number"
        text_id = str(int(value))
    elif isinstance(value, str):
        text_id = value
    elif isinstance(value, uuid.UUID):
        text_id = str(value)
    elif isinstance(value, Unconvertible):
        return None, f"id cannot be converted: {value.reason}"
    else:
        return None, f"id of type {type(value).__name__} is not text"
    if not text_id.strip():
        return None, None
    if len(text_id) > MAX_MEMBER_ID_LENGTH:
        return None, f"id of {len(text_id)} characters (at most {MAX_MEMBER_ID_LENGTH})"
    if (found := _FORBIDDEN_ID.search(text_id)) is not None:
        if found.group() >= "\ud800":  # a byte the source's text decoding could not read
            return None, f"id {text_id[:40]!r} is not valid UTF-8"
        return None, f"id {text_id[:40]!r} contains a newline, tab or NUL"
    return text_id, None


def _is_whole_number(value: float | decimal.Decimal) -> bool:
    finite = value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)
    return finite and value == int(value)


def traits_json(row: Sequence[Any], trait_indexes: Sequence[tuple[str, int]]) -> str | None:
    """The row's traits as a JSON object text, exactly as ``json.dumps(…, ensure_ascii=False)``
    writes it (the planner compares stored texts to find changed traits), built directly for
    the common value types."""
    if not trait_indexes:
        return None
    parts = []
    for name, index in trait_indexes:
        value = row[index]
        kind = type(value)
        if kind is str:
            encoded = encode_basestring(value)
        elif value is None:
            encoded = "null"
        elif kind is bool:
            encoded = "true" if value else "false"
        elif kind is int:
            encoded = int.__repr__(value)
        else:
            encoded = json.dumps(json_value(value), ensure_ascii=False)
        parts.append(f"{encode_basestring(name)}: {encoded}")
    return "{" + ", ".join(parts) + "}"


# A staging row: (id_kind, member_id, anonymous_id, traits JSON, a trait group's values JSON).
StagingRow = tuple[str, str, str | None, str | None, str | None]


def validate_row(
    row: Sequence[Any],
    user_index: int | None,
    anon_index: int | None,
    trait_indexes: Sequence[tuple[str, int]],
) -> StagingRow | str:
    """A staging row for one audience query row — ``(id_kind, member_id, anonymous_id, traits
    JSON, None)`` — or why the row is invalid."""
    user_id, user_problem = (
        normalize_id(row[user_index]) if user_index is not None else (None, None)
    )
    anon_id, anon_problem = (
        normalize_id(row[anon_index]) if anon_index is not None else (None, None)
    )
    if user_problem:
        return f"user_id: {user_problem}"
    if user_id is None and anon_problem:
        return f"anonymous_id: {anon_problem}"
    if user_id is None and anon_id is None:
        return "no user_id or anonymous_id (NULL or blank)"
    traits = traits_json(row, trait_indexes)
    if user_id is not None:
        return ("user", user_id, anon_id, traits, None)
    assert anon_id is not None
    return ("anonymous", anon_id, None, traits, None)


@dataclass(frozen=True)
class HeldRow:
    """An invalid trait group row whose member is known: staged without values (the member
    keeps the values it has; it neither leaves nor enters), and counted invalid."""

    row: StagingRow
    reason: str


def validate_trait_row(
    row: Sequence[Any],
    user_index: int | None,
    anon_index: int | None,
    trait_indexes: Sequence[tuple[str, int]],
) -> StagingRow | HeldRow | str:
    """A staging row for one trait group row — ``(id_kind, member_id, anonymous_id, None,
    values JSON)`` — or, for values without a JSON form, a ``HeldRow``; or why the row is
    invalid (its ids, by the audiences' rule)."""
    checked = validate_row(row, user_index, anon_index, ())
    if isinstance(checked, str):
        return checked
    try:
        value = row_object([(name, row[index]) for name, index in trait_indexes])
    except InvalidValue as invalid:
        label = "user_id" if checked[0] == "user" else "anonymous_id"
        return HeldRow(checked, f"{label} {checked[1]!r}: {invalid}")
    return (checked[0], checked[1], checked[2], None, value)


class StateWriteFailed(Exception):
    """Staging a chunk into the state DB failed (disk full, locked): carried past the source
    query's error handling, so that it is reported as the state DB's error."""

    def __init__(self, error: SQLAlchemyError) -> None:
        super().__init__(str(error))
        self.error = error


def source_error(audience: str, source: str, exc: SQLAlchemyError) -> SourceError:
    """``audience``: how messages name the computation (``ComputationConfig.title``)."""
    reason = driver_reason(exc)
    return SourceError(f'{audience}: query failed on source "{source}": {reason}')


def stage_from_source(
    source: Engine,
    state: Connection,
    run_id: int,
    *,
    audience: str,
    source_name: str,
    query: str | Executable,
    traits: Sequence[str],
    chunk_size: int,
    commit_each_chunk: bool = True,
    after_chunk: Callable[[], None] | None = None,
    trait_columns: TraitColumns | None = None,
) -> SnapshotStats:
    """Stream the query's rows from ``source`` into the staging table of ``state``.

    A value the driver cannot convert (SQLite text that is not UTF-8, a PostgreSQL
    ``infinity`` date) fails the whole fetch. The query then runs once more on a connection
    that reads such values as markers, and their rows are invalid: the common case pays
    nothing for it.

    ``audience``: how errors name the computation (``ComputationConfig.title``).
    ``query``: SQL text, or a statement (rules compiled by ``sync.rules``).
    ``trait_columns``: the query is a trait group's; its rows are staged as values.
    """
    stream = partial(
        _stream,
        source,
        state,
        run_id,
        audience=audience,
        query=query,
        traits=traits,
        chunk_size=chunk_size,
        commit_each_chunk=commit_each_chunk,
        after_chunk=after_chunk,
        trait_columns=trait_columns,
    )
    try:
        try:
            stats = stream(tolerant=False)
        except SQLAlchemyError as exc:
            if not conversion_failed(exc):
                raise
            state.execute(delete(STAGED).where(STAGED.c.run_id == run_id))
            stats = stream(tolerant=True)
    except SQLAlchemyError as exc:
        raise source_error(audience, source_name, exc) from None
    except StateWriteFailed as failed:
        raise failed.error from None  # the state DB's, not the source's
    stats.staged = count_staged(state, run_id)
    stats.count_duplicates()
    return stats


def _stream(
    source: Engine,
    state: Connection,
    run_id: int,
    *,
    audience: str,
    query: str | Executable,
    traits: Sequence[str],
    chunk_size: int,
    commit_each_chunk: bool,
    after_chunk: Callable[[], None] | None,
    tolerant: bool,
    trait_columns: TraitColumns | None,
) -> SnapshotStats:
    stats = SnapshotStats()
    statement = insert_ignoring_duplicates(state)
    validate: Callable[..., StagingRow | HeldRow | str]
    validate = _validate_tolerant if tolerant else validate_row
    if trait_columns is not None:
        validate = validate_trait_row  # reads unconvertible values as invalid itself
    with source.connect() as connection:
        if tolerant:
            tolerate_unconvertible(connection)
        result = connection.execution_options(stream_results=True, yield_per=chunk_size).execute(
            text(query) if isinstance(query, str) else query
        )
        columns = list(result.keys())
        if problem := query_problem(columns, traits):
            raise SourceError(f"{audience}: the query {problem}")
        user_index = columns.index("user_id") if "user_id" in columns else None
        anon_index = columns.index("anonymous_id") if "anonymous_id" in columns else None
        trait_indexes = [(name, columns.index(name)) for name in dict.fromkeys(traits)]
        if trait_columns is not None:
            trait_indexes = trait_columns.indexes(columns)
            stats.trait_names = [name for name, _ in trait_indexes]
        for chunk in result.partitions(chunk_size):
            staged_rows: list[tuple[Any, ...]] = []
            for row in chunk:
                stats.rows += 1
                checked = validate(row, user_index, anon_index, trait_indexes)
                if isinstance(checked, str):
                    stats.add_invalid(invalid_sample(stats.rows, checked))
                    continue
                if isinstance(checked, HeldRow):
                    stats.add_invalid(invalid_sample(stats.rows, checked.reason))
                    stats.held += 1
                    checked = checked.row
                staged_rows.append((run_id, *checked))
            try:
                if staged_rows:
                    insert_staged(state, statement, staged_rows)
                if commit_each_chunk:
                    state.commit()
            except SQLAlchemyError as exc:
                raise StateWriteFailed(exc) from exc
            if after_chunk is not None:
                after_chunk()  # renews the lease; raises to stop a shutting-down run
        if tolerant:
            connection.invalidate()  # not back to the pool with its markers
    return stats


def _validate_tolerant(
    row: Sequence[Any],
    user_index: int | None,
    anon_index: int | None,
    trait_indexes: Sequence[tuple[str, int]],
) -> StagingRow | str:
    """``validate_row`` for rows read by a tolerant connection: a trait that could not be read
    makes its row invalid (ids are checked by ``normalize_id``)."""
    checked = validate_row(row, user_index, anon_index, trait_indexes)
    if isinstance(checked, str):
        return checked
    for name, index in trait_indexes:
        if problem := _unreadable(row[index]):
            label = "user_id" if checked[0] == "user" else "anonymous_id"
            return f"trait {name} of {label} {checked[1]!r}: {problem}"
    return checked


def _unreadable(value: Any) -> str | None:
    if isinstance(value, Unconvertible):
        return f"cannot be converted: {value.reason}"
    if isinstance(value, str):
        return "not valid UTF-8" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        return next(filter(None, map(_unreadable, value)), None)
    return None
