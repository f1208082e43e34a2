"""`retire KEY --destination D` and what it leaves reserved at D (``retired_destinations``):
retired again after coming back, wholly retired later, handed to a renamed destination, nulls
that failed or reached only some members, a configured group that dropped D, the migration
(hostile review of the change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from sqlalchemy import Engine, func, insert, select

from sync.cli import cli
from sync.state.db import current_revision, downgrade, upgrade
from sync.state.tables import AUDIENCES, MEMBERSHIPS, RETIRED_DESTINATIONS, utcnow
from tests.harness import Harness
from tests.receiver import Receiver

GROUP = "Support Traits"
KEY = "support_traits"
AUDIENCE_KEY = "high_value_users"


def _cli(harness: Harness, *arguments: str) -> Any:
    config = str(harness.write_config())
    return CliRunner().invoke(cli, ["--config", config, *arguments])


def _retire(harness: Harness, *arguments: str) -> str:
    result = _cli(harness, "retire", *arguments)
    assert result.exit_code == 0, result.output
    return str(result.output)


def _retired_rows(engine: Engine) -> list[tuple[Any, ...]]:
    r = RETIRED_DESTINATIONS
    with engine.connect() as connection:
        return [
            (key, destination, json.loads(names))
            for key, destination, names in connection.execute(
                select(AUDIENCES.c.key, r.c.destination, r.c.names)
                .join(AUDIENCES, AUDIENCES.c.id == r.c.audience_id)
                .order_by(AUDIENCES.c.key, r.c.destination)
            )
        ]


def _preview(harness: Harness, tmp_path: Path, name: str = "preview") -> Path:
    out = tmp_path / f"{name}.jsonl"
    harness.destinations[name] = {"type": "file", "path": str(out)}
    return out


def _taking_group(destinations: list[str], column: str = AUDIENCE_KEY) -> str:
    listed = ", ".join(f'"{d}"' for d in destinations)
    return (
        f'[[traits]]\nname = "{GROUP}"\nsource = "warehouse"\ndestinations = [{listed}]\n'
        f'query = "SELECT user_id, plan AS {column} FROM summary"\n'
    )


def _summary(harness: Harness) -> None:
    harness.warehouse_sql(
        "CREATE TABLE IF NOT EXISTS summary (user_id TEXT, plan TEXT)",
        "DELETE FROM summary",
        "INSERT INTO summary VALUES ('u1', 'pro')",
    )


def _plan_group(harness: Harness, rows: str) -> str:
    """A summary table holding ``rows`` (user_id, plan), and the TOML of a trait group sending
    its ``plan``, without its ``destinations`` line."""
    harness.warehouse_sql("CREATE TABLE summary (user_id TEXT, plan TEXT)")
    harness.warehouse_sql(f"INSERT INTO summary VALUES {rows}")
    return (
        f'[[traits]]\nname = "{GROUP}"\nsource = "warehouse"\n'
        'query = "SELECT user_id, plan FROM summary"\n'
    )


def _assert_refused(report: Any, destination: str, *, retired: bool = True) -> None:
    assert report.status == "failed", (report.status, report.error)
    error = str(report.error)
    assert f'column "{AUDIENCE_KEY}" is also the key of ' in error, error
    assert f'destination "{destination}"' in error, error
    assert "\n" not in error, error
    if retired:
        assert "allow_key_reuse = true" in error, error


# (1) re-added, synced, retired there again (twice)
def test_retiring_at_a_destination_again_after_re_adding_it(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    _preview(harness, tmp_path)
    harness.set_members(["u1"])
    for _ in range(3):
        harness.audience["destinations"] = ["segment", "preview"]
        assert harness.sync().status == "succeeded"
        harness.audience["destinations"] = ["segment"]
        _retire(harness, AUDIENCE_KEY, "--destination", "preview", "--send-false")
        assert _retired_rows(harness.engine) == [(AUDIENCE_KEY, "preview", [AUDIENCE_KEY])]
    _summary(harness)
    harness.config_extra = _taking_group(["preview"])
    _assert_refused(harness.sync_named(GROUP), "preview")
    # a dry run (4) judges it the same way
    _assert_refused(harness.sync_named(GROUP, dry_run=True), "preview")


# (2) later removed from the config and retired wholly
def test_a_key_retired_at_one_destination_then_wholly_stays_reserved(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    _preview(harness, tmp_path)
    harness.set_members(["u1"])
    harness.audience["destinations"] = ["segment", "preview"]
    assert harness.sync().status == "succeeded"
    harness.audience["destinations"] = ["segment"]
    _retire(harness, AUDIENCE_KEY, "--destination", "preview")
    harness.audience = {
        "name": "Others",
        "query": "SELECT user_id FROM members",
        "destinations": ["segment"],
    }
    _retire(harness, AUDIENCE_KEY, "--send-false")
    _summary(harness)
    for destination in ("preview", "segment"):
        harness.config_extra = _taking_group([destination])
        _assert_refused(harness.sync_named(GROUP), destination)
        _assert_refused(harness.sync_named(GROUP, dry_run=True), destination)
    # an audience carrying a trait of that name (7: one line, names all)
    harness.audience["traits"] = [AUDIENCE_KEY]
    harness.audience["query"] = f"SELECT user_id, 'x' AS {AUDIENCE_KEY} FROM members"
    harness.audience["destinations"] = ["preview"]
    harness.config_extra = ""
    report = harness.sync()
    assert report.status == "failed", report.error
    error = str(report.error)
    assert f'the trait "{AUDIENCE_KEY}" it carries' in error, error
    assert 'destination "preview"' in error and "allow_key_reuse = true" in error, error
    assert "\n" not in error


# (3) the heir: same place under a new name, old name still defined
def test_a_destination_handed_to_its_heir_records_nothing_and_stays_reserved(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    out = _preview(harness, tmp_path)
    harness.destinations["preview2"] = {"type": "file", "path": str(out)}
    harness.set_members(["u1"])
    harness.audience["destinations"] = ["segment", "preview"]
    assert harness.sync().status == "succeeded"
    harness.audience["destinations"] = ["segment", "preview2"]
    _retire(harness, AUDIENCE_KEY, "--destination", "preview")
    assert _retired_rows(harness.engine) == []
    assert set(harness.memberships("preview2")) == {"u1"}
    assert harness.memberships("preview") == {}
    assert harness.sync().status == "succeeded"
    _summary(harness)
    harness.config_extra = _taking_group(["preview2"])
    _assert_refused(harness.sync_named(GROUP), "preview2", retired=False)


# (5) --send-null only partly delivered
def test_a_group_whose_nulls_failed_at_a_dropped_destination_keeps_its_traits_there(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    harness.destinations["dead"] = {
        "type": "segment",
        "write_key": "wk_dead",
        "endpoint": "http://127.0.0.1:9",
        "timeout": 1,
        "batch_size": 100,
    }
    group = _plan_group(harness, "('u1', 'pro')")
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    out = _preview(harness, tmp_path)
    assert harness.sync_named(GROUP).status == "succeeded"
    # "preview" now goes nowhere (a directory as its file): the nulls cannot be written
    out.unlink()
    out.mkdir()
    harness.config_extra = group + 'destinations = ["segment"]\n'
    result = _cli(harness, "retire", KEY, "--destination", "preview", "--send-null")
    assert result.exit_code != 0, result.output
    assert _retired_rows(harness.engine) == []  # nothing forgotten, nothing recorded
    assert set(harness.memberships("preview")) == {"u1"}
    # The group still holds "plan" at "preview" (not retired there): an audience keyed "plan"
    # there is refused.
    harness.audience["name"] = "Plan"
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["u1"])
    out.rmdir()
    report = harness.sync_named("Plan")
    assert report.status == "failed", "an audience took the key of a group still holding it"
    # Given up: retired without nulls, the traits are recorded as held.
    _retire(harness, KEY, "--destination", "preview")
    assert _retired_rows(harness.engine) == [(KEY, "preview", ["plan"])]


# (6) upgrade from 0016 with data, downgrade and re-upgrade
def test_0017_upgrades_existing_data_and_downgrades(bare_engine: Engine) -> None:
    upgrade(bare_engine, "0016")
    with bare_engine.begin() as connection:
        connection.execute(
            insert(AUDIENCES).values(
                id=1, key="a", name="A", kind="audience", created_at=utcnow(),
                definition_hash="x", destinations_hash="y",
            )
        )  # fmt: skip
    upgrade(bare_engine, "0017")
    assert current_revision(bare_engine) == "0017"
    with bare_engine.begin() as connection:
        connection.execute(
            insert(RETIRED_DESTINATIONS).values(
                audience_id=1, destination="d" * 100, names='["a"]', retired_at=utcnow()
            )
        )
        count = connection.execute(select(func.count()).select_from(RETIRED_DESTINATIONS))
        assert count.scalar() == 1
        names = connection.execute(select(RETIRED_DESTINATIONS.c.names)).scalar()
        assert json.loads(names) == ["a"]
    downgrade(bare_engine, "0016")
    assert current_revision(bare_engine) == "0016"
    upgrade(bare_engine, "0017")
    assert current_revision(bare_engine) == "0017"
    with bare_engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(MEMBERSHIPS)).scalar() == 0
        assert connection.execute(select(AUDIENCES.c.key)).scalars().all() == ["a"]


# A configured group that no longer lists D, not retired there
def test_a_configured_group_that_dropped_a_destination_keeps_its_traits_there(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """Its values stay at "preview" until `retire KEY --destination preview --send-null`, which
    would then null the trait an audience named like it sends there. An audience that dropped
    a destination was held there (``_removed_keys``), a configured trait group was not."""
    _preview(harness, tmp_path)
    group = _plan_group(harness, "('u1', 'pro')")
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra = group + 'destinations = ["segment"]\n'
    harness.audience["name"] = "Plan"
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["u1"])
    report = harness.sync_named("Plan")
    assert report.status == "failed", "an audience took the key of a group still holding it"
    error = str(report.error)
    assert f'"plan" is a trait of trait group "{GROUP}" at destination "preview"' in error, error
    assert f"`audience-sync retire {KEY} --destination preview --send-null`" in error, error
    assert "\n" not in error, error
    _retire(harness, KEY, "--destination", "preview", "--send-null")
    assert harness.sync_named("Plan").status == "succeeded"


# (8) a group's own names stay its own where it was retired; `check --probe` refuses as a run
def test_a_group_may_come_back_where_it_was_retired_and_probe_sees_the_reservation(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    _preview(harness, tmp_path)
    group = _plan_group(harness, "('u1', 'pro')")
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra = group + 'destinations = ["segment"]\n'
    _retire(harness, KEY, "--destination", "preview")
    assert _retired_rows(harness.engine) == [(KEY, "preview", ["plan"])]
    # an audience keyed "plan" at preview: the probe refuses it as the run does
    harness.audience["name"] = "Plan"
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["u1"])
    probe = _cli(harness, "check", "--probe", "--json")
    assert "allow_key_reuse" in probe.output, probe.output
    assert harness.sync_named("Plan").status == "failed"
    harness.audience["destinations"] = ["segment"]
    # the group itself comes back to preview (its own names are not refused to it), and may
    # be retired there again, with its nulls, without a duplicate key on retired_destinations
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    report = harness.sync_named(GROUP)
    assert report.status == "succeeded", report.error
    harness.config_extra = group + 'destinations = ["segment"]\n'
    _retire(harness, KEY, "--destination", "preview", "--send-null")


# (1)+(5) for a trait group: the nulls of a later `--send-null` reach only its members of then
def test_nulls_at_a_destination_do_not_free_what_earlier_members_still_hold_there(
    harness: Harness, receiver: Receiver, tmp_path: Path
) -> None:
    """Retired at "preview" without nulls, u1 and u2 keep "plan" there (recorded). The group
    comes back to "preview" with u1 only, and is retired there again with --send-null: the
    nulls reach u1, not u2: the record of the first retire must stay (it was deleted, and an
    audience keyed "plan" took the name there while u2's profile still held the group's)."""
    out = _preview(harness, tmp_path)
    group = _plan_group(harness, "('u1', 'pro'), ('u2', 'free')")
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra = group + 'destinations = ["segment"]\n'
    _retire(harness, KEY, "--destination", "preview")
    harness.warehouse_sql("DELETE FROM summary WHERE user_id = 'u2'")
    harness.config_extra = group + 'destinations = ["segment", "preview"]\n'
    assert harness.sync_named(GROUP).status == "succeeded"
    harness.config_extra = group + 'destinations = ["segment"]\n'
    _retire(harness, KEY, "--destination", "preview", "--send-null")
    held: dict[str, Any] = {}
    for line in out.read_text().splitlines():
        message = json.loads(line)
        held.setdefault(message["userId"], {}).update(message["traits"])
    assert held == {"u1": {"plan": None}, "u2": {"plan": "free"}}  # u2 still holds it
    harness.audience["name"] = "Plan"
    harness.audience["destinations"] = ["preview"]
    harness.set_members(["u1"])
    report = harness.sync_named("Plan")
    assert report.status == "failed", "the audience took \"plan\" while u2 holds the group's"
