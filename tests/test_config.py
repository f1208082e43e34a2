from pathlib import Path

import pytest

from sync.config import load_config, parse_config
from sync.destinations import SegmentSettings, WebhookSettings
from sync.errors import ConfigError
from tests.conftest import REPO

VALID = """
[sources.warehouse]
url = "sqlite:///warehouse.db"

[destinations.preview]
type = "file"
path = "out/messages.jsonl"

[[audiences]]
name = "High Value Users"
source = "warehouse"
query = "SELECT user_id FROM t"
destinations = ["preview"]
"""


def parse(text: str, environ: dict[str, str] | None = None, base: Path = Path("/srv/sync")):
    return parse_config(text, "audience-sync.toml", base, environ or {})


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    return caught.value.problems


def test_example_config_loads_without_environment() -> None:
    config = load_config(REPO / "config.example.toml", environ={})
    keys = [a.trait_key for a in config.audiences]
    assert keys == [
        "order_completed_last_30days",
        "high_value_users",
        "lapsed_buyers",
        "trial_expiring_7d",
    ]
    # Both ways of defining a computation are shown: rules, and one SQL audience and group.
    assert [a.query is None for a in config.audiences] == [True, True, True, False]
    assert [g.query is None for g in config.traits] == [True, False]
    assert config.state.url == f"sqlite:///{REPO / 'audience-sync.db'}"
    assert config.sources["warehouse"].demo


def test_defaults_and_relative_paths() -> None:
    config = parse(VALID)
    assert config.state.url == "sqlite:////srv/sync/audience-sync.db"
    assert config.sources["warehouse"].url == "sqlite:////srv/sync/warehouse.db"
    assert config.destinations["preview"].path == "/srv/sync/out/messages.jsonl"  # type: ignore[union-attr]
    audience = config.audiences[0]
    assert audience.trait_key == "high_value_users"
    assert config.schedule_of(audience).interval_seconds == 15 * 60
    assert config.max_removal_ratio_of(audience) == 0.5
    assert config.guard_min_members_of(audience) == 100


def test_absolute_and_memory_urls_are_left_alone() -> None:
    text = VALID.replace('"sqlite:///warehouse.db"', '"sqlite:////data/w.db"')
    text = '[state]\nurl = "postgresql+psycopg://u:pw@db/sync"\n' + text
    config = parse(text)
    assert config.sources["warehouse"].url == "sqlite:////data/w.db"
    assert config.state.url == "postgresql+psycopg://u:pw@db/sync"


def test_environment_interpolation_with_defaults_and_escape() -> None:
    text = (
        VALID
        + """
[destinations.seg]
type = "segment"
write_key = "${WRITE_KEY}"
endpoint = "${ENDPOINT:-https://collector.local}"

[destinations.hook]
type = "webhook"
url = "https://h.local/$${literal}"
secret = "${HOOK_SECRET:-}"
"""
    )
    config = parse(text, {"WRITE_KEY": "wk_123"})
    seg = config.destinations["seg"]
    assert isinstance(seg, SegmentSettings)
    assert seg.write_key.get_secret_value() == "wk_123"
    assert seg.endpoint == "https://collector.local"
    hook = config.destinations["hook"]
    assert isinstance(hook, WebhookSettings)
    assert hook.url == "https://h.local/${literal}"
    assert "wk_123" in config.secrets()
    assert "wk_123" not in repr(config)


def test_per_audience_settings_override_defaults() -> None:
    text = VALID.replace(
        'destinations = ["preview"]',
        'destinations = ["preview"]\nschedule = "*/5 * * * *"\nmax_removal_ratio = 0.2\n'
        "guard_min_members = 10",
    )
    config = parse(text + '\n[defaults]\nschedule = "1h"\n')
    audience = config.audiences[0]
    assert config.schedule_of(audience).cron == "*/5 * * * *"
    assert config.max_removal_ratio_of(audience) == 0.2
    assert config.guard_min_members_of(audience) == 10


BROKEN = [
    ("unknown key", VALID + '\n[defaults]\nshedule = "1h"\n', "defaults.shedule", "schedule"),
    (
        "wrong type",
        VALID + '\n[defaults]\nmax_attempts = "many"\n',
        "defaults.max_attempts",
        "integer",
    ),
    (
        "undefined source",
        VALID.replace('source = "warehouse"', 'source = "lake"'),
        "audiences[0].source",
        "[sources.lake]",
    ),
    (
        "undefined destination",
        VALID.replace('["preview"]', '["preview", "crm"]'),
        "audiences[0].destinations[1]",
        "[destinations.crm]",
    ),
    (
        "unknown destination type",
        VALID.replace('type = "file"', 'type = "ftp"'),
        "destinations.preview.type",
        "segment, wishpond, webhook, file",
    ),
    (
        "missing env var",
        VALID + '\n[destinations.s]\ntype = "segment"\nwrite_key = "${SEGMENT_KEY}"\n',
        "destinations.s.write_key",
        "SEGMENT_KEY",
    ),
    (
        "bad schedule",
        VALID + '\n[defaults]\nschedule = "every fortnight"\n',
        "defaults.schedule",
        "5-field cron",
    ),
    (
        "bad cron",
        VALID.replace(
            'destinations = ["preview"]', 'destinations = ["preview"]\nschedule = "61 * * * *"'
        ),
        "audiences[0].schedule",
        "cron",
    ),
    (
        "webhook url that is not http",
        VALID + '\n[destinations.hook]\ntype = "webhook"\nurl = "ftp://u:x@127.0.0.1/x"\n',
        "destinations.hook.url",
        "http:// or https://",
    ),
    (
        "webhook url with a port that is not a number",
        VALID + '\n[destinations.hook]\ntype = "webhook"\nurl = "http://h.local:notaport/x"\n',
        "destinations.hook.url",
        "not a valid URL",
    ),
    (
        "segment endpoint without a host",
        VALID + '\n[destinations.seg]\ntype = "segment"\nwrite_key = "wk"\nendpoint = "https://"\n',
        "destinations.seg.endpoint",
        "with a host",
    ),
    (
        "destination name longer than the state DB keeps",
        VALID + f'\n[destinations.{"d" * 101}]\ntype = "file"\npath = "x.jsonl"\n',
        "destinations",
        "at most 100",
    ),
    (
        "cron that never fires",
        VALID.replace(
            'destinations = ["preview"]', 'destinations = ["preview"]\nschedule = "0 0 31 2 *"'
        ),
        'audiences[0].schedule (audience "High Value Users")',
        "never fires",
    ),
    (
        "duplicate audience name",
        VALID + VALID[VALID.index("[[audiences]]") :],
        "audiences[1].name",
        "duplicate audience name",
    ),
    (
        "duplicate key",
        VALID
        + VALID[VALID.index("[[audiences]]") :].replace('"High Value Users"', '"high value users"'),
        "audiences[1]",
        "high_value_users",
    ),
    (
        "empty query",
        VALID.replace('"SELECT user_id FROM t"', '"   "'),
        "audiences[0].query",
        "empty",
    ),
    (
        "negative batch size",
        VALID.replace('type = "file"', 'type = "file"\nbatch_size = -5'),
        "destinations.preview.batch_size",
        "greater than 0",
    ),
    ("not TOML at all", "this is { not toml", "not valid TOML", "line 1"),
    (
        "missing required key",
        VALID.replace('query = "SELECT user_id FROM t"\n', ""),
        "audiences[0].query",
        "add query",
    ),
    (
        "invalid explicit key",
        VALID.replace('name = "High Value Users"', 'name = "H"\nkey = "High-Value"'),
        "audiences[0].key",
        "lowercase",
    ),
    (
        "name gives empty key",
        VALID.replace('"High Value Users"', '"!!!"'),
        "audiences[0].name",
        "empty trait key",
    ),
    (
        "ratio out of range",
        VALID + "\n[defaults]\nmax_removal_ratio = 1.5\n",
        "defaults.max_removal_ratio",
        "less than or equal to 1",
    ),
    (
        "no destinations",
        VALID.replace('["preview"]', "[]"),
        "audiences[0].destinations",
        "at least 1",
    ),
    (
        "bad database url",
        VALID.replace('"sqlite:///warehouse.db"', '"not a url"'),
        "sources.warehouse.url",
        "not a database URL",
    ),
    (
        "destination type missing",
        VALID.replace('type = "file"\n', ""),
        "destinations.preview.type",
        "add type",
    ),
    (
        "batch size above Segment's limit",
        VALID + '\n[destinations.s]\ntype = "segment"\nwrite_key = "k"\nbatch_size = 3000\n',
        "destinations.s.batch_size",
        "2500",
    ),
]


@pytest.mark.parametrize(("case", "text", "path", "hint"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_configs_name_the_toml_path(case: str, text: str, path: str, hint: str) -> None:
    problems = problems_of(text)
    matching = [p for p in problems if p.startswith(path) or path in p]
    assert matching, f"{case}: no problem mentions {path}: {problems}"
    assert any(hint in p for p in matching), f"{case}: {hint!r} not in {matching}"
    for problem in problems:
        assert "\n" not in problem and "Traceback" not in problem


def test_all_problems_reported_at_once() -> None:
    text = VALID.replace('source = "warehouse"', 'source = "lake"') + (
        '\n[defaults]\nschedule = "sometimes"\nmax_attempts = 0\n'
    )
    problems = problems_of(text)
    assert len(problems) == 3
    assert str(ConfigError("audience-sync.toml", problems)).startswith(
        "audience-sync.toml: 3 problems"
    )


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(folder)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=str(binary)):
        load_config(binary)


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "audience-sync.toml"
    path.write_text(VALID)
    config = load_config(path, environ={})
    assert config.sources["warehouse"].url == f"sqlite:///{tmp_path / 'conf' / 'warehouse.db'}"


def test_an_audience_s_extra_trait_named_like_another_audience_s_key_is_refused(
    tmp_path: Path,
) -> None:
    """Audience "Plan" sends `plan: true`; audience "B" carries the column `plan` as a trait
    to the same destination: the destination would hold one value for both (hostile review:
    it flipped between true and "pro")."""
    text = (
        '[sources.wh]\nurl = "sqlite:///wh.db"\n'
        '[destinations.f]\ntype = "file"\npath = "out.jsonl"\n'
        '[[audiences]]\nname = "Plan"\nsource = "wh"\nquery = "select user_id from t"\n'
        'destinations = ["f"]\n'
        '[[audiences]]\nname = "B"\nsource = "wh"\nquery = "select user_id, plan from t"\n'
        'traits = ["plan"]\ndestinations = ["f"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "x.toml", tmp_path, {})
    message = str(caught.value)
    assert 'audiences[1].traits: "plan" is also the key of audience "Plan"' in message
    assert 'at destination "f"' in message and "x.toml" in message
    # At different destinations the two never meet.
    parse_config(text.replace('traits = ["plan"]\ndestinations = ["f"]', 'traits = ["plan"]\n'
                 'destinations = ["g"]').replace(
        '[[audiences]]', '[destinations.g]\ntype = "file"\npath = "g.jsonl"\n[[audiences]]', 1
    ), "x.toml", tmp_path, {})


def test_a_carried_trait_named_like_a_trait_group_s_key_is_no_clash(tmp_path: Path) -> None:
    """A trait group's key is never sent as a trait (it names the group in
    context.personas.computation_key): only audiences' keys clash (second review)."""
    text = (
        '[sources.wh]\nurl = "sqlite:///wh.db"\n'
        '[destinations.f]\ntype = "file"\npath = "out.jsonl"\n'
        '[[audiences]]\nname = "A2"\nsource = "wh"\nquery = "select user_id, support_traits from t"\n'
        'traits = ["support_traits"]\ndestinations = ["f"]\n'
        '[[traits]]\nname = "Support Traits"\nsource = "wh"\nquery = "select user_id, n from t"\n'
        'destinations = ["f"]\n'
    )
    parse_config(text, "x.toml", tmp_path, {})
    rules = (  # a rules group's trait named like another group's key: no clash either
        text.replace('traits = ["support_traits"]', "traits = []")
        + '[[traits]]\nname = "Other"\nsource = "wh"\ndestinations = ["f"]\n'
        '[traits.rules]\nsupport_traits = { count = { event = "Order Completed" } }\n'
    )
    parse_config(rules, "x.toml", tmp_path, {})
