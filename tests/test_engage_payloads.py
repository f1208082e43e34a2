"""What Segment's own audience destinations read from an Engage message: external_audience_id
and audience_settings under context.personas, space_id (README "Destinations")."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.cli import cli
from sync.errors import ConfigError
from sync.messages import AudienceContext, MembershipChange, MessageEncoder, build_messages
from tests.harness import Harness
from tests.receiver import Receiver

KEY = "high_value_users"
json_leaves = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=20)
settings_values = st.dictionaries(
    st.text(min_size=1, max_size=12),
    json_leaves | st.lists(json_leaves, max_size=3),
    max_size=4,
)


@settings(max_examples=200, derandomize=True)
@given(
    external=st.text(min_size=1, max_size=40),
    audience_settings=st.none() | settings_values,
    mode=st.sampled_from(["identify", "track", "both"]),
    desired=st.booleans(),
)
def test_generated_messages_carry_the_audience_s_engage_fields(
    external: str, audience_settings: dict[str, Any] | None, mode: Any, desired: bool
) -> None:
    ctx = AudienceContext(
        "inst",
        1,
        KEY,
        "segment",
        mode,
        external_audience_id=external,
        audience_settings=audience_settings,
    )
    moment = datetime(2026, 11, 29, tzinfo=UTC)
    value = "true" if desired else "false"
    encoded = MessageEncoder(ctx).messages("user", "u1", None, value, 1, moment, None)
    built = build_messages(ctx, MembershipChange("user", "u1", None, desired, 1, moment, None))
    assert [json.loads(m) for m in encoded] == built
    for message in map(json.loads, encoded):
        personas = message["context"]["personas"]
        assert personas["external_audience_id"] == external
        if audience_settings is None:
            assert "audience_settings" not in personas
        else:
            assert personas["audience_settings"] == audience_settings


def test_an_audience_s_destination_settings_reach_every_message(
    harness: Harness, receiver: Receiver
) -> None:
    harness.audience["destination_settings"] = {
        "segment": {
            "external_audience_id": "t2_abc123",
            "audience_settings": {"audience_name": "high_value", "identifier_type": "email"},
        }
    }
    harness.destinations["segment"]["mode"] = "both"
    harness.set_members(["a", "b"])
    assert harness.sync().status == "succeeded"
    messages = receiver.messages()
    assert len(messages) == 4
    for message in messages:
        personas = message["context"]["personas"]
        assert personas["external_audience_id"] == "t2_abc123"
        assert personas["audience_settings"] == {
            "audience_name": "high_value",
            "identifier_type": "email",
        }


def test_settings_for_a_destination_the_audience_does_not_list_are_an_error(
    harness: Harness,
) -> None:
    harness.audience["destination_settings"] = {"elsewhere": {"external_audience_id": "x"}}
    with pytest.raises(ConfigError, match=r"destination_settings\.elsewhere.*not one of"):
        harness.config()


@pytest.mark.parametrize("space_id", ["", "spa_123"])
def test_check_warns_once_about_a_segment_destination_without_space_id(
    tmp_path: Path, space_id: str
) -> None:
    config = tmp_path / "audience-sync.toml"
    config.write_text(
        f'[state]\nurl = "sqlite:///{tmp_path / "state.db"}"\n'
        f'[sources.w]\nurl = "sqlite:///{tmp_path / "w.db"}"\n'
        '[destinations.seg]\ntype = "segment"\nwrite_key = "wk_abcdef"\n'
        f'space_id = "{space_id}"\n'
        '[[audiences]]\nname = "A"\nsource = "w"\nquery = "SELECT 1 AS user_id"\n'
        'destinations = ["seg"]\n'
        '[[audiences]]\nname = "B"\nsource = "w"\nquery = "SELECT 2 AS user_id"\n'
        'destinations = ["seg"]\n'
    )
    CliRunner().invoke(cli, ["--config", str(config), "db", "upgrade"])
    result = CliRunner().invoke(cli, ["--config", str(config), "check", "--json"])
    warnings = [w for w in json.loads(result.output)["warnings"] if "space_id" in w]
    assert len(warnings) == (0 if space_id else 1)
    if warnings:
        assert warnings[0].startswith('destination "seg" has no space_id')


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("{ since = 2026-11-29T00:00:00Z }", "audience_settings.since is a TOML datetime"),
        ("{ f = nan }", "audience_settings.f is nan, which JSON cannot carry"),
        ("{ nested = { x = [1, inf] } }", "audience_settings.nested.x[1] is inf"),
    ],
)
def test_audience_settings_json_cannot_carry_are_a_config_error(
    harness: Harness, written: str, problem: str
) -> None:
    harness.config_extra = ""
    text = harness.config_text() + (
        f"[audiences.destination_settings.segment]\naudience_settings = {written}\n"
    )
    from sync.config import parse_config

    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text, "t.toml", harness.tmp_path, {})
