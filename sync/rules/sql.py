"""The few SQL pieces SQLAlchemy does not abstract, each one construct with a rendering per
database (SQLAlchemy's ``@compiles`` extension point): time arithmetic, substring search and a
JSON array aggregate. Only integers we computed ourselves are rendered inline; every value a
user wrote travels as a bound parameter.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import String, literal_column
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

# SQLite keeps timestamps as ISO text: both sides of every comparison are normalised to one
# fixed form (a "T" or a "Z" in the stored text would otherwise break text comparison).
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%f"
MYSQL_DIALECTS = ("mysql", "mariadb")


class TimeValue(FunctionElement[Any]):
    """A timestamp as comparable by the database (SQLite: normalised ISO text)."""

    inherit_cache = True
    name = "time_value"


@compiles(TimeValue)
def _time_value(element: TimeValue, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(TimeValue, "sqlite")
def _time_value_sqlite(element: TimeValue, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('{SQLITE_TIME_FORMAT}', {compiler.process(element.clauses, **kw)})"


class TimeShift(FunctionElement[Any]):
    """A timestamp moved by a whole number of seconds (negative: into the past)."""

    inherit_cache = True
    name = "time_shift"

    def __init__(self, expression: ColumnElement[Any], seconds: int) -> None:
        # The seconds are part of the statement's text (and its cache key), never user text.
        super().__init__(expression, literal_column(str(int(seconds))))


def _shift_parts(element: TimeShift, compiler: SQLCompiler, **kw: Any) -> tuple[str, int]:
    expression, seconds = list(element.clauses)
    return compiler.process(expression, **kw), int(seconds.name)


@compiles(TimeShift)
def _time_shift(element: TimeShift, compiler: SQLCompiler, **kw: Any) -> str:
    expression, seconds = _shift_parts(element, compiler, **kw)
    return f"({expression} + INTERVAL '{seconds}' SECOND)"


@compiles(TimeShift, "sqlite")
def _time_shift_sqlite(element: TimeShift, compiler: SQLCompiler, **kw: Any) -> str:
    expression, seconds = _shift_parts(element, compiler, **kw)
    return f"strftime('{SQLITE_TIME_FORMAT}', {expression}, '{seconds:+d} seconds')"


@compiles(TimeShift, "postgresql")
def _time_shift_postgresql(element: TimeShift, compiler: SQLCompiler, **kw: Any) -> str:
    expression, seconds = _shift_parts(element, compiler, **kw)
    return f"({expression} + INTERVAL '{seconds} seconds')"


def _time_shift_mysql(element: TimeShift, compiler: SQLCompiler, **kw: Any) -> str:
    expression, seconds = _shift_parts(element, compiler, **kw)
    return f"DATE_ADD({expression}, INTERVAL {seconds} SECOND)"


class Contains(FunctionElement[Any]):
    """Whether a text contains another, by the database's own comparison (case-sensitive on
    SQLite and PostgreSQL; MySQL follows the column's collation). Not LIKE: SQLite's LIKE
    ignores case, and a value's % and _ would be wildcards."""

    inherit_cache = True
    name = "contains"


@compiles(Contains)
def _contains(element: Contains, compiler: SQLCompiler, **kw: Any) -> str:
    haystack, needle = list(element.clauses)
    return compiler.process(haystack.contains(needle, autoescape=False), **kw)


@compiles(Contains, "sqlite")
def _contains_instr(element: Contains, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(instr({compiler.process(element.clauses, **kw)}) > 0)"


@compiles(Contains, "mysql")
@compiles(Contains, "mariadb")
def _contains_locate(element: Contains, compiler: SQLCompiler, **kw: Any) -> str:
    # LOCATE(needle, haystack): no wildcards (LIKE would read a value's % and _ as them).
    haystack, needle = list(element.clauses)
    return f"(LOCATE({compiler.process(needle, **kw)}, {compiler.process(haystack, **kw)}) > 0)"


@compiles(Contains, "postgresql")
def _contains_strpos(element: Contains, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(strpos({compiler.process(element.clauses, **kw)}) > 0)"


class JsonArrayAgg(FunctionElement[Any]):
    """The JSON array of a group's values (a unique_list trait)."""

    inherit_cache = True
    name = "json_array_agg"


@compiles(JsonArrayAgg)
def _json_array_agg(element: JsonArrayAgg, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"unique_list needs a JSON array aggregate, which audience-sync knows on SQLite, "
        f"PostgreSQL and MySQL/MariaDB, not on {compiler.dialect.name}"
    )


@compiles(JsonArrayAgg, "sqlite")
def _json_group_array(element: JsonArrayAgg, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_group_array({compiler.process(element.clauses, **kw)})"


@compiles(JsonArrayAgg, "postgresql")
def _json_agg(element: JsonArrayAgg, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_agg({compiler.process(element.clauses, **kw)})"


def _json_arrayagg(element: JsonArrayAgg, compiler: SQLCompiler, **kw: Any) -> str:
    return f"JSON_ARRAYAGG({compiler.process(element.clauses, **kw)})"


for _dialect in MYSQL_DIALECTS:
    compiles(TimeShift, _dialect)(_time_shift_mysql)
    compiles(JsonArrayAgg, _dialect)(_json_arrayagg)


def _sort_key(value: Any) -> tuple[int, Any]:
    # One column's values share a type; the rank only keeps mixed ones (and null) sortable.
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    return (4, json.dumps(value, sort_keys=True))


class SortedJsonArray(TypeDecorator[Any]):
    """A unique_list as read: the database's JSON array (text on SQLite and MySQL, decoded by
    the driver on PostgreSQL) as a Python list, sorted. Sorting here, not in SQL, keeps one
    order on every database (SQLite's aggregates take no ORDER BY before 3.44, MySQL's
    JSON_ARRAYAGG none at all, and collations differ)."""

    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        items = json.loads(value) if isinstance(value, str | bytes) else list(value)
        return sorted(items, key=_sort_key)
