"""How rules map onto a warehouse: Segment's warehouse schema by default (README "Rules").

An event's rows are in a table named by the snake-cased event name (``Order Completed`` →
``order_completed``) with ``user_id``, ``anonymous_id``, ``timestamp`` and one column per
snake-cased property; user traits are columns of ``users``, keyed by ``id``.
``[sources.NAME.schema]`` overrides any of it. Every name that reaches SQL is checked against
``IDENTIFIER`` and quoted by SQLAlchemy: user input is never SQL text.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sync.keys import derive_key

# Names that may reach SQL as identifiers: letters, digits and underscores, not starting with a
# digit; 63 characters is PostgreSQL's limit (NAMEDATALEN - 1), the smallest of our databases.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# "snake_case": Segment's warehouse naming (event and property names snake-cased);
# "as_is": names are used exactly as written (and must be identifiers).
NameRule = Literal["snake_case", "as_is"]


def identifier_problem(name: str) -> str | None:
    """Why ``name`` cannot be a table or column name, or None."""
    if IDENTIFIER.match(name):
        return None
    return (
        f"{name!r} is not a valid table or column name (letters, digits and underscores, not "
        "starting with a digit, at most 63 characters)"
    )


def _check_identifier(value: str | None) -> str | None:
    if value is not None and (problem := identifier_problem(value)):
        raise ValueError(problem)
    return value


class SchemaMapping(BaseModel):
    """``[sources.NAME.schema]``: where a source keeps Segment's tables and columns."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # The database schema (PostgreSQL schema, MySQL database) holding the tables; None: the
    # connection's default.
    db_schema: str | None = Field(default=None, alias="schema")
    names: NameRule = "snake_case"
    # Explicit tables for some events (event name → table), beside the naming rule.
    event_tables: dict[str, str] = Field(default_factory=dict)
    user_id: str = "user_id"
    anonymous_id: str = "anonymous_id"
    timestamp: str = "timestamp"
    users_table: str = "users"
    users_id: str = "id"

    _identifiers = field_validator(
        "db_schema", "user_id", "anonymous_id", "timestamp", "users_table", "users_id"
    )(_check_identifier)

    @field_validator("event_tables")
    @classmethod
    def _check_tables(cls, value: dict[str, str]) -> dict[str, str]:
        for table in value.values():
            _check_identifier(table)
        return value

    def _name(self, written: str) -> str:
        return derive_key(written) if self.names == "snake_case" else written

    def event_table(self, event: str) -> str:
        """The table of ``event``'s rows; raises ``ValueError`` when it is no identifier."""
        name = self.event_tables.get(event) or self._name(event)
        if problem := identifier_problem(name):
            raise ValueError(f"event {event!r} maps to no table: {problem}")
        return name

    def column(self, written: str, what: str = "property") -> str:
        """The column of a property (or a trait of ``users``); raises ``ValueError``."""
        name = self._name(written)
        if problem := identifier_problem(name):
            raise ValueError(f"{what} {written!r} maps to no column: {problem}")
        return name


SEGMENT_SCHEMA = SchemaMapping()
