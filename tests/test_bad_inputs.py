"""The bad-input catalogue: every case ends in a clear one-line error (or a clearly counted
problem), never a traceback, and nothing already recorded is lost."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from sync.cli import cli
from tests.harness import Harness
from tests.receiver import Receiver, Scripted

KEY = "high_value_users"


class Case:
    """The harness after a first successful sync of members a and b."""

    def __init__(self, harness: Harness, receiver: Receiver, tmp_path: Path) -> None:
        self.h, self.receiver, self.tmp_path = harness, receiver, tmp_path
        harness.set_members(["a", "b"])
        assert harness.sync().status == "succeeded"
        self.baseline = harness.memberships()
        self.config = harness.write_config()

    def cli(self, *args: str, config: Path | None = None) -> tuple[int, str]:
        """Exit code and stdout (log lines go to stderr)."""
        result = CliRunner().invoke(cli, ["--config", str(config or self.h.write_config()), *args])
        assert "Traceback" not in result.output
        return result.exit_code, result.stdout if "--json" in args else result.output

    def sync_report(self, *args: str) -> dict[str, Any]:
        code, output = self.cli("sync", "--json", *args)
        reports = json.loads(output)
        assert len(reports) == 1
        report = reports[0]
        if report["error"]:
            assert "\n" not in report["error"]
        return report | {"exit_code": code}

    def error_line(self, code: int, output: str, *needles: str) -> None:
        assert code != 0
        lines = [line for line in output.strip().splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, output
        for needle in needles:
            assert needle in lines[0], lines[0]

    def nothing_lost(self) -> None:
        rows = self.h.memberships(destination="segment")
        for member in ("a", "b"):
            assert rows[member].desired is True and rows[member].synced_value == "true", member


def config_text(case: Case) -> str:
    return case.config.read_text()


# --- configuration and state database ---------------------------------------------------------


def unreadable_config(case: Case) -> None:
    folder = case.tmp_path / "folder.toml"
    folder.mkdir()
    case.error_line(*case.cli("sync", config=folder), "cannot read the config file")
    binary = case.tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    case.error_line(*case.cli("sync", config=binary), str(binary))


def config_for_a_newer_version(case: Case) -> None:
    path = case.tmp_path / "newer.toml"
    path.write_text("version = 2\n" + config_text(case))
    case.error_line(
        *case.cli("sync", config=path), "version: this file is written for a newer audience-sync"
    )


def state_db_on_a_newer_schema(case: Case) -> None:
    with case.h.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    case.error_line(*case.cli("sync"), "9999_future", "upgrade audience-sync")
    case.error_line(*case.cli("status"), "upgrade audience-sync")
    with case.h.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": _head()})


def _head() -> str:
    from sync.state.db import head_revision

    return head_revision()


def state_db_missing(case: Case) -> None:
    path = case.tmp_path / "other.toml"
    path.write_text(
        config_text(case).replace(
            case.h.engine.url.render_as_string(hide_password=False),
            f"sqlite:///{case.tmp_path / 'nope' / 'state.db'}",
        )
    )
    case.error_line(*case.cli("status", config=path), "does not exist")
    case.error_line(*case.cli("sync", config=path), "folder", "does not exist")


def state_db_read_only(case: Case) -> None:
    url = case.h.engine.url
    if url.get_backend_name() == "sqlite":
        read_only = f"sqlite:///file:{url.database}?mode=ro&uri=true"
    elif url.get_backend_name() == "mysql":
        read_only = url.update_query_dict(
            {"init_command": "SET SESSION TRANSACTION READ ONLY"}
        ).render_as_string(hide_password=False)
    else:
        read_only = url.update_query_dict(
            {"options": f"{url.query['options']} -cdefault_transaction_read_only=on"}
        ).render_as_string(hide_password=False)
    path = case.tmp_path / "ro.toml"
    path.write_text(config_text(case).replace(url.render_as_string(hide_password=False), read_only))
    case.h.set_members(["a", "b", "c"])
    code, output = case.cli("sync", config=path)
    assert code == 1 and "state database error" in output, output
    assert "readonly" in output.replace("-", "").replace(" ", "").lower()


# --- sources -------------------------------------------------------------------------------------


def source_unreachable(case: Case) -> None:
    case.h.source_url = "postgresql+psycopg://reader@127.0.0.1:1/warehouse"
    report = case.sync_report()
    assert report["status"] == "failed" and 'source "warehouse"' in report["error"]
    assert "refused" in report["error"] or "connect" in report["error"]


def source_file_missing(case: Case) -> None:
    case.h.source_url = f"sqlite:///{case.tmp_path / 'gone.db'}"
    report = case.sync_report()
    assert report["status"] == "failed" and "does not exist" in report["error"]


def query_syntax_error(case: Case) -> None:
    case.h.audience["query"] = "SELEKT user_id FROM members"
    report = case.sync_report()
    assert report["status"] == "failed" and "syntax error" in report["error"]


def query_missing_user_id(case: Case) -> None:
    case.h.audience.update(query="SELECT email FROM members", traits=["email"])
    report = case.sync_report()
    assert report["status"] == "failed" and "needs a user_id column" in report["error"]


def trait_not_a_column(case: Case) -> None:
    case.h.audience["traits"] = ["email", "plan"]
    report = case.sync_report()
    assert "traits plan that are not columns" in report["error"]


def _rows(case: Case, rows: list[tuple[Any, ...]], columns: str = "user_id, email") -> None:
    with sqlite3.connect(case.h.warehouse) as db:
        db.execute("DROP TABLE members")
        db.execute(f"CREATE TABLE members ({columns})")
        marks = ", ".join("?" * len(rows[0]))
        db.executemany(f"INSERT INTO members VALUES ({marks})", rows)
    db.close()


def user_id_of_wrong_types(case: Case) -> None:
    _rows(case, [("a", "a@x"), ("b", "b@x"), (12, "n@x"), (b"\x00\x01", "blob@x"), (3.5, "f@x")])
    report = case.sync_report()
    assert report["status"] == "succeeded" and report["invalid"] == 2 and report["members"] == 3
    assert any("not text" in s for s in report["invalid_samples"])
    assert case.receiver.state[("12", KEY)] is True


def null_and_empty_ids(case: Case) -> None:
    _rows(case, [("a", "a@x"), ("b", "b@x"), (None, "null@x"), ("", "empty@x"), ("  ", "blank@x")])
    report = case.sync_report()
    assert report["invalid"] == 3 and "NULL or blank" in report["invalid_samples"][0]


def ids_with_newlines_or_10kb(case: Case) -> None:
    _rows(case, [("a", "a@x"), ("b", "b@x"), ("evil\nid", "n@x"), ("z" * 10_240, "long@x")])
    report = case.sync_report()
    assert report["invalid"] == 2
    assert any("10240 characters" in s for s in report["invalid_samples"])


def traits_with_non_json_values(case: Case) -> None:
    with sqlite3.connect(case.h.warehouse, detect_types=sqlite3.PARSE_DECLTYPES) as db:
        db.execute("DROP TABLE members")
        db.execute(
            "CREATE TABLE members (user_id TEXT, email TEXT, joined DATE, spent DECIMAL, raw BLOB)"
        )
        db.executemany(
            "INSERT INTO members VALUES (?, ?, '2026-01-02', 12.50, X'c3a9')",
            [("a", "a@x"), ("b", "b@x"), ("c", "c@x")],
        )
    db.close()
    case.h.audience.update(
        query="SELECT user_id, email, joined, CAST(spent AS NUMERIC) AS spent, raw FROM members",
        traits=["email", "joined", "spent", "raw"],
    )
    report = case.sync_report()
    assert report["status"] == "succeeded"
    sent = next(m for m in case.receiver.messages() if m["userId"] == "c")["traits"]
    assert sent["joined"] == "2026-01-02" and sent["spent"] == 12.5 and sent["raw"] == "é"


def duplicate_rows_with_different_traits(case: Case) -> None:
    _rows(case, [("a", "a@x"), ("b", "b@x"), ("c", "first@x"), ("c", "second@x")])
    report = case.sync_report()
    assert report["duplicates"] == 1 and report["members"] == 3
    assert len([m for m in case.receiver.messages() if m["userId"] == "c"]) == 1


def unicode_names_and_ids(case: Case) -> None:
    case.h.audience["name"] = "Clients Café Über 30j"
    # Same query as the old audience: a likely rename, refused until the old key is retired.
    assert case.cli("retire", KEY) == (0, f"audience {KEY} retired; its key stays reserved\n")
    _rows(case, [("ünïcødé-用户", "u@x"), ("😀", "e@x")])
    report = case.sync_report()
    assert report["key"] == "clients_cafe_uber_30j" and report["status"] == "succeeded"
    assert case.receiver.state[("ünïcødé-用户", "clients_cafe_uber_30j")] is True


def ids_differing_in_case_accents_or_spaces(case: Case) -> None:
    """Ids are compared byte for byte on every state DB (MariaDB's default collation would
    merge 'CaseA' with 'casea' and 'Müller' with 'muller')."""
    ids = ["CaseA", "casea", "Müller", "muller", "a ", "😀" * 255]
    _rows(case, [("a", "a@x"), ("b", "b@x"), *[(i, f"{i}@x") for i in ids]])
    report = case.sync_report()
    assert report["status"] == "succeeded" and report["members"] == 2 + len(ids), report
    assert report["duplicates"] == 0 and report["invalid"] == 0
    assert {i: case.receiver.state.get((i, KEY)) for i in ids} == dict.fromkeys(ids, True)
    assert sorted(case.h.memberships()) == sorted(["a", "b", *ids])


def backslashes_and_quotes_in_ids_and_traits(case: Case) -> None:
    """Characters that bulk-load formats escape (COPY text on PostgreSQL, JSON everywhere)."""
    ids = ["back\\slash", 'quo"te', "\\N", "tab\\tlike"]
    _rows(case, [("a", "a@x"), ("b", "b@x"), *[(i, f"{i}@x\\y") for i in ids]])
    assert case.sync_report()["status"] == "succeeded"
    by_user = {m["userId"]: m["traits"]["email"] for m in case.receiver.messages()}
    assert {i: by_user.get(i) for i in ids} == {i: f"{i}@x\\y" for i in ids}


# --- destinations --------------------------------------------------------------------------------


def _new_member_stays_pending(case: Case) -> None:
    row = case.h.memberships()["c"]
    assert row.synced_value is None and row.status == "pending" and row.last_error


def destination_url_does_not_resolve(case: Case) -> None:
    case.h.destinations["segment"]["endpoint"] = "http://collector.invalid"
    # Long enough for a first attempt on a loaded machine (retries are 10-50 ms apart).
    case.h.defaults["delivery_time_budget"] = "2s"
    case.h.set_members(["a", "b", "c"])
    # A moved endpoint is refused until a full sync accepts it (test_drift).
    assert "--full" in str(case.sync_report()["error"])
    report = case.sync_report("--full")
    assert report["status"] == "partial" and "ConnectError" in report["destinations"][0]["error"]
    _new_member_stays_pending(case)


def tls_failure(case: Case) -> None:
    case.h.destinations["segment"]["endpoint"] = case.receiver.url.replace("http://", "https://")
    case.h.set_members(["a", "b", "c"])
    report = case.sync_report("--full")  # a new scheme is a moved endpoint (test_drift)
    assert report["status"] == "failed" and "TLS failure" in report["error"]
    _new_member_stays_pending(case)


def credentials_rejected(case: Case) -> None:
    case.h.destinations["segment"]["write_key"] = "revoked"
    case.h.set_members(["a", "b", "c"])
    report = case.sync_report()
    assert report["exit_code"] == 1 and "rejected the credentials (HTTP 401" in report["error"]
    _new_member_stays_pending(case)


def receiver_returns_html(case: Case) -> None:
    case.h.defaults["delivery_time_budget"] = "2s"
    case.receiver.script = [
        Scripted(200, "<!DOCTYPE html><html>Sign in</html>", {"Content-Type": "text/html"})
    ] * 1000
    case.h.set_members(["a", "b", "c"])
    report = case.sync_report()
    assert report["status"] == "partial" and "HTML page" in report["destinations"][0]["error"]
    _new_member_stays_pending(case)
    assert case.h.memberships()["c"].in_doubt  # a proxy may have forwarded it


def ok_with_malformed_body(case: Case) -> None:
    case.receiver.script = [Scripted(200, "{not json")]
    case.h.set_members(["a", "b", "c"])
    report = case.sync_report()
    # The status code is the acknowledgement; the body is not needed.
    assert report["status"] == "succeeded" and case.h.memberships()["c"].synced_value == "true"


def not_found_endpoint(case: Case) -> None:
    case.receiver.script = [Scripted(404, "no such route")]
    case.h.set_members(["a", "b", "c"])
    report = case.sync_report()
    assert report["status"] == "failed" and "HTTP 404" in report["error"]
    _new_member_stays_pending(case)


def disk_full_for_the_file_destination(case: Case) -> None:
    case.h.destinations["preview"] = {"type": "file", "path": "/proc/audience-sync/out.jsonl"}
    case.h.audience["destinations"] = ["segment", "preview"]
    report = case.sync_report()
    assert (
        report["status"] == "failed"
        and "cannot write /proc/audience-sync/out.jsonl" in report["error"]
    )


def message_over_32kb(case: Case) -> None:
    _rows(case, [("a", "a@x"), ("b", "b@x"), ("c", "y" * 40_000)])
    report = case.sync_report()
    # Sent without the trait that made it too big, and said so.
    assert report["status"] == "succeeded" and report["destinations"][0]["trimmed"] == 1
    assert case.h.memberships()["c"].synced_value == "true"


# --- time, names, commands -----------------------------------------------------------------------


def clock_going_backwards(case: Case) -> None:
    from datetime import timedelta

    from sync import clock

    real = clock.local_now

    def yesterday() -> Any:
        return real() - timedelta(days=1)

    # The host's clock (the state DB's too on SQLite) jumps back a day.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clock, "local_now", yesterday)
        case.h.set_members(["a", "c"])
        report = case.sync_report()
    assert report["status"] == "succeeded"
    assert case.receiver.state[("b", KEY)] is False and case.receiver.state[("c", KEY)] is True
    case.h.set_members(["a", "b", "c"])
    assert case.sync_report()["status"] == "succeeded"  # and time moves on again
    case.nothing_lost()


def unknown_audience_on_the_command_line(case: Case) -> None:
    case.error_line(*case.cli("sync", "nope"), 'no audience named "nope"')
    case.error_line(*case.cli("members", "nope"), 'no audience "nope"')


def missing_environment_variable(case: Case) -> None:
    path = case.tmp_path / "env.toml"
    path.write_text(config_text(case).replace('"wk_test_secret_123"', '"${NOT_SET_ANYWHERE}"'))
    case.error_line(
        *case.cli("sync", config=path), "destinations.segment.write_key", "NOT_SET_ANYWHERE"
    )


def emptied_source_is_guarded(case: Case) -> None:
    case.h.defaults["guard_min_members"] = 2
    case.h.set_members([])
    report = case.sync_report()
    assert report["status"] == "guarded" and "--force" in report["error"]


def retire_an_active_audience(case: Case) -> None:
    case.error_line(*case.cli("retire", KEY), "still in the config")


def include_exited_without_full(case: Case) -> None:
    code, output = case.cli("sync", "--include-exited")
    assert code == 2 and "--include-exited goes with --full" in output


CASES: dict[str, Callable[[Case], None]] = {
    f.__name__: f
    for f in (
        unreadable_config,
        config_for_a_newer_version,
        state_db_on_a_newer_schema,
        state_db_missing,
        state_db_read_only,
        source_unreachable,
        source_file_missing,
        query_syntax_error,
        query_missing_user_id,
        trait_not_a_column,
        user_id_of_wrong_types,
        null_and_empty_ids,
        ids_with_newlines_or_10kb,
        traits_with_non_json_values,
        duplicate_rows_with_different_traits,
        unicode_names_and_ids,
        ids_differing_in_case_accents_or_spaces,
        backslashes_and_quotes_in_ids_and_traits,
        destination_url_does_not_resolve,
        tls_failure,
        credentials_rejected,
        receiver_returns_html,
        ok_with_malformed_body,
        not_found_endpoint,
        disk_full_for_the_file_destination,
        message_over_32kb,
        clock_going_backwards,
        unknown_audience_on_the_command_line,
        missing_environment_variable,
        emptied_source_is_guarded,
        retire_an_active_audience,
        include_exited_without_full,
    )
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, harness: Harness, receiver: Receiver, tmp_path: Path) -> None:
    case = Case(harness, receiver, tmp_path)
    CASES[name](case)
    case.nothing_lost()
