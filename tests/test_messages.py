"""MessageEncoder splices stored values into pre-encoded JSON; build_messages is the spec."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sync.messages import (
    AudienceContext,
    MembershipChange,
    MessageEncoder,
    build_messages,
    encode,
    message_id,
)

KEY = "high_value"
texts = st.text(min_size=1, max_size=12)
trait_values = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
trait_keys = st.sampled_from(["email", "plan", "é", KEY, "x y"]) | texts
storings = st.sampled_from(
    [
        lambda t: json.dumps(t),  # SQLAlchemy's JSON type on SQLite: spaces, ASCII escapes
        lambda t: json.dumps(t, ensure_ascii=False),  # PostgreSQL COPY staging
        lambda t: json.dumps(t, separators=(",", ":")),  # json_object() in SQL
        lambda t: json.dumps(t, indent=1),
    ]
)


def _ordered(value: Any) -> Any:
    """JSON value with object key order made significant for comparison."""
    if isinstance(value, dict):
        return [(k, _ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


@settings(max_examples=300, derandomize=True)
@given(
    mode=st.sampled_from(["identify", "track", "both"]),
    kind=st.sampled_from(["user", "anonymous"]),
    member=texts,
    anonymous=st.none() | texts,
    desired=st.booleans(),
    version=st.integers(1, 10**6),
    traits=st.none() | st.dictionaries(trait_keys, trait_values, max_size=4),
    store=storings,
    integrations=st.none() | st.just({"All": False, "Wishpond": True}),
    space=st.sampled_from(["", "spa_1"]),
    naive_text=st.booleans(),
    micros=st.integers(0, 10**6 - 1),
)
def test_encoder_matches_build_messages(
    mode: Any,
    kind: str,
    member: str,
    anonymous: str | None,
    desired: bool,
    version: int,
    traits: dict[str, Any] | None,
    store: Any,
    integrations: dict[str, Any] | None,
    space: str,
    naive_text: bool,
    micros: int,
) -> None:
    ctx = AudienceContext("inst", 7, KEY, "segment", mode, space, "", integrations)
    moment = datetime(2026, 11, 28, 12, 0, tzinfo=UTC) + timedelta(microseconds=micros)
    change = MembershipChange(kind, member, anonymous, desired, version, moment, traits)
    expected = [encode(m) for m in build_messages(ctx, change)]
    # As read from the state DB: SQLite gives zone-less UTC text, PostgreSQL an aware datetime.
    stored_at: datetime | str = moment.replace(tzinfo=None).isoformat(" ") if naive_text else moment
    stored = None if traits is None else store(traits)
    value = "true" if desired else "false"
    got = MessageEncoder(ctx).messages(kind, member, anonymous, value, version, stored_at, stored)
    assert [_ordered(json.loads(m)) for m in got] == [_ordered(json.loads(m)) for m in expected]


def test_encoder_replaces_a_trait_named_like_the_audience_key() -> None:
    ctx = AudienceContext("inst", 7, KEY, "segment")
    stamp = datetime(2026, 11, 28, tzinfo=UTC)
    traits = json.dumps({"email": "a@x.io", KEY: "stale"})
    (message,) = MessageEncoder(ctx).messages("user", "u1", None, "false", 3, stamp, traits)
    assert json.loads(message)["traits"] == {"email": "a@x.io", KEY: False}


def test_encoder_treats_empty_and_null_traits_as_none() -> None:
    ctx = AudienceContext("inst", 7, KEY, "segment", "both")
    stamp = datetime(2026, 11, 28, tzinfo=UTC)
    encoder = MessageEncoder(ctx)
    for stored in (None, "{}", "{ }", "null"):
        identify, track = (
            json.loads(m) for m in encoder.messages("user", "u", None, "true", 1, stamp, stored)
        )
        assert identify["traits"] == {KEY: True}
        assert "traits" not in track["context"]


def test_message_ids_never_change_across_versions() -> None:
    """A resend after an upgrade must carry the id the old version sent, or destinations that
    de-duplicate would apply it twice: the derivation is pinned here."""
    ctx = AudienceContext("inst", 3, "k", "segment")
    change = MembershipChange("user", "ü-1", None, True, 7, datetime(2026, 1, 1, tzinfo=UTC), None)
    pinned = "as-ca9a9f239258484a4bc94e1810c682c2e910a905-v7"
    assert message_id(ctx, change, "identify") == pinned
    (encoded,) = MessageEncoder(ctx).messages(
        "user", "ü-1", None, "true", 7, change.changed_at, None
    )
    assert json.loads(encoded)["messageId"] == pinned
