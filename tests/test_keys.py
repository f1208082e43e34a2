from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.config import parse_config
from sync.errors import ConfigError
from sync.keys import MAX_KEY_LENGTH, derive_key, key_problem, name_key_problem


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("High Value Users", "high_value_users"),
        ("HighValueUsers", "high_value_users"),
        ("  Trial -- Expiring (7d)!  ", "trial_expiring_7d"),
        ("Café Clients", "cafe_clients"),
        ("A/B test group", "a_b_test_group"),
        ("already_snake_case", "already_snake_case"),
        ("Über-Kunden 2024", "uber_kunden_2024"),
    ],
)
def test_derive_key(name: str, key: str) -> None:
    assert derive_key(name) == key
    assert key_problem(key) is None


def test_name_without_letters_or_digits_is_an_error() -> None:
    assert derive_key("!!!") == ""
    problem = name_key_problem("!!!")
    assert problem is not None and "'!!!'" in problem and "empty" in problem


def test_name_starting_with_digit_needs_explicit_key() -> None:
    problem = name_key_problem("30 day buyers")
    assert problem is not None and "start with a letter" in problem


@pytest.mark.parametrize("bad", ["", "Upper", "1abc", "has-dash", "sp ace", "x" * 101])
def test_invalid_explicit_keys(bad: str) -> None:
    assert key_problem(bad) is not None


def test_two_audiences_with_one_key_names_both() -> None:
    text = """
[sources.w]
url = "sqlite:///w.db"
[destinations.f]
type = "file"
path = "out.jsonl"
[[audiences]]
name = "High Value Users"
source = "w"
query = "select 1"
destinations = ["f"]
[[audiences]]
name = "HighValueUsers"
source = "w"
query = "select 1"
destinations = ["f"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.toml", Path("/tmp"))
    message = str(caught.value)
    assert '"High Value Users"' in message and '"HighValueUsers"' in message
    assert '"high_value_users"' in message and "audiences[1]" in message


@given(st.text(max_size=80))
def test_derived_keys_are_valid_or_reported(name: str) -> None:
    key = derive_key(name)
    if name_key_problem(name) is None:
        assert key_problem(key) is None
        assert len(key) <= MAX_KEY_LENGTH
    # Derivation is stable: deriving from a key gives the key back.
    if key:
        assert derive_key(key) == key
