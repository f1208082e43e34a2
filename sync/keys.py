"""Trait keys: the snake_case name an audience is known by at every destination.

A key is derived once from the audience name (``Order Completed Last 30days`` →
``order_completed_last_30days``) unless the config gives one, and is then frozen in the state DB.
"""

from __future__ import annotations

import re

import inflection

# Segment accepts longer trait names, but a key is also part of every messageId (< 100 chars
# in total), so keep it short enough to leave room for the other parts.
MAX_KEY_LENGTH = 100

_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def derive_key(name: str) -> str:
    """Derive a trait key from an audience name; empty when the name has no letters or digits.

    ``underscore`` splits CamelCase words, ``transliterate`` (inside ``parameterize``) folds
    accents to ASCII, and ``parameterize`` turns every other run of characters into one ``_``.
    Digits stay attached to their word: ``30days`` stays whole.
    """
    ascii_name = inflection.transliterate(name)
    return str(inflection.parameterize(inflection.underscore(ascii_name), separator="_"))


def key_problem(key: str) -> str | None:
    """Return why ``key`` is not a valid explicit trait key, or None when it is valid."""
    if not key:
        return "a key may not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"a key is at most {MAX_KEY_LENGTH} characters, this one has {len(key)}"
    if not _KEY_PATTERN.match(key):
        return (
            f"not a valid key: {key!r}; use lowercase letters, digits and underscores, "
            f"starting with a letter (e.g. {derive_key(key) or 'my_audience'!r})"
        )
    return None


def name_key_problem(name: str) -> str | None:
    """Return why the key derived from ``name`` is unusable, or None."""
    derived = derive_key(name)
    if not derived:
        return (
            f"the name {name!r} gives an empty trait key; add letters or digits to the name "
            'or set key = "..." explicitly'
        )
    if not derived[0].isalpha():
        return (
            f"the name {name!r} gives the key {derived!r}, which does not start with a letter; "
            'set key = "..." explicitly'
        )
    if len(derived) > MAX_KEY_LENGTH:
        return (
            f"the name {name!r} gives a key of {len(derived)} characters (at most "
            f'{MAX_KEY_LENGTH}); shorten the name or set key = "..." explicitly'
        )
    return None
