"""A trait group's rows as values: every column but the ids is a trait named by the column, and
a row becomes one canonical JSON object text — keys sorted, no spaces — that the planner compares
byte for byte with what the destination acknowledged (README "SQL traits").

Values: text, integers, decimals (exact JSON numbers), floats, booleans, dates and timestamps
(ISO-8601, UTC), NULL, and JSON arrays and objects. NaN and infinities, bytes, text that is not
UTF-8 and types without a JSON form make the row invalid (never the run); so does a row whose
JSON is over ``MAX_TRAIT_ROW_BYTES``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from sync.errors import SourceError
from sync.keys import derive_key, key_problem
from sync.run.sources import Unconvertible

# The largest row of values, as JSON, a trait group sends (Segment takes 32 KB per message: the
# rest is ids, context and the messageId).
MAX_TRAIT_ROW_BYTES = 16_384
ID_COLUMNS = ("user_id", "anonymous_id")
# Lone surrogates: bytes a source's text was decoded around (not valid UTF-8).
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidValue(ValueError):
    """Why a value has no JSON form."""


def _text(value: str) -> str:
    if _SURROGATE.search(value):
        raise InvalidValue("text that is not valid UTF-8")
    return encode_basestring(value)


def _timestamp(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return f'"{value.isoformat()}Z"'  # a timestamp without a zone is taken as UTC


def _decimal(value: decimal.Decimal) -> str:
    if not value.is_finite():
        raise InvalidValue(f"{value} is not a JSON number")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _float(value: float) -> str:
    if not math.isfinite(value):
        raise InvalidValue(f"{value} is not a JSON number")
    return float.__repr__(value)


def canonical(value: Any) -> str:
    """The JSON text of one value (objects with sorted keys, no spaces); raises
    ``InvalidValue``."""
    # Most common types first; bool before int (a bool is an int).
    if value is None:
        return "null"
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, dt.datetime):
        return _timestamp(value)
    if isinstance(value, dt.date | dt.time):
        return f'"{value.isoformat()}"'
    if isinstance(value, uuid.UUID):
        return f'"{value}"'
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidValue("a JSON object with keys that are not text")
        items = sorted(value.items())
        return "{" + ",".join(f"{_text(k)}:{canonical(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, Unconvertible):
        raise InvalidValue(f"cannot be converted: {value.reason}")
    if isinstance(value, bytes | bytearray | memoryview):
        raise InvalidValue("bytes are not a trait value (cast them to text in the query)")
    raise InvalidValue(f"a value of type {type(value).__name__} has no JSON form")


def row_object(names_and_values: Sequence[tuple[str, Any]]) -> str:
    """A row's values as one JSON object text; ``names_and_values`` sorted by name. Raises
    ``InvalidValue`` naming the trait."""
    parts = []
    for name, value in names_and_values:
        kind = type(value)
        try:
            # The common types inline (this runs for every value of every row).
            if kind is str and _SURROGATE.search(value) is None:
                encoded = encode_basestring(value)
            elif kind is int:
                encoded = int.__repr__(value)
            elif value is None:
                encoded = "null"
            else:
                encoded = canonical(value)
        except InvalidValue as invalid:
            raise InvalidValue(f"trait {name}: {invalid}") from None
        parts.append(f'"{name}":{encoded}')  # names are keys: plain ASCII, nothing to escape
    text = "{" + ",".join(parts) + "}"
    size = len(text.encode("utf-8"))
    if size > MAX_TRAIT_ROW_BYTES:
        raise InvalidValue(
            f"its values are {size:,} bytes of JSON, over the limit of {MAX_TRAIT_ROW_BYTES:,}"
        )
    return text


def exit_value(names: Sequence[str]) -> str:
    """A leaver's row with ``on_exit = "null"``: every trait null."""
    return row_object([(name, None) for name in sorted(names)])


@dataclass(frozen=True)
class TraitColumns:
    """A trait group's rule for its query's columns: which keys are taken (``reserved``: key →
    what holds it, e.g. an audience at the same destination)."""

    group: str
    reserved: Mapping[str, str] = field(default_factory=dict)
    rules: bool = False  # a rules group: its columns are its rules' names, not query aliases

    @property
    def rename(self) -> str:
        """How to give a column another name."""
        return "rename it in [traits.rules]" if self.rules else "alias it in the query"

    def indexes(self, columns: Sequence[str]) -> list[tuple[str, int]]:
        """``(trait, column index)`` of every column but the ids, sorted by name; raises a
        ``SourceError`` for a column that is not a valid key, is taken, or is repeated."""
        found: list[tuple[str, int]] = []
        for index, column in enumerate(columns):
            if column in ID_COLUMNS:
                continue
            if problem := key_problem(column):
                alias = derive_key(column) or "my_trait"
                if alias in ID_COLUMNS or not alias[0].isalpha():  # not an id by accident
                    alias = f"trait_{alias}"
                raise SourceError(
                    f'trait group "{self.group}": column "{column}" cannot be a trait key '
                    f"({problem}); {self.rename}, e.g. " + (alias if self.rules else f"AS {alias}")
                )
            if column in self.reserved:
                raise SourceError(
                    f'trait group "{self.group}": column "{column}" is also the key of '
                    f"{self.reserved[column]}; {self.rename}"
                )
            if any(name == column for name, _ in found):
                raise SourceError(
                    f'trait group "{self.group}": column "{column}" appears twice in the '
                    "query's result; alias one of them"
                )
            found.append((column, index))
        if not found:
            raise SourceError(
                f'trait group "{self.group}": the query returns no trait columns (only '
                f"{', '.join(columns)}); add the columns to send"
            )
        return sorted(found)
