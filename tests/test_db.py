import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, Text, cast, insert, inspect, select, text
from sqlalchemy.orm import Session

from sync.errors import SchemaOutOfDateError, SchemaTooNewError, StateDatabaseMissingError
from sync.state.db import (
    compare_column_type,
    current_revision,
    downgrade,
    head_revision,
    installation_id,
    make_state_engine,
    require_current_schema,
    schema_status,
    upgrade,
)
from sync.state.tables import AUDIENCES, DELIVERY_BATCHES, MEMBERSHIPS, Audience, Base, Run
from tests import state_templates
from tests.conftest import fresh_state_url

TABLES = {"installation", "audiences", "memberships", "runs"}


@pytest.fixture
def state_engine(bare_engine: Engine) -> Engine:
    """Here, unlike elsewhere (``tests/state_templates.py``), every test migrates for real."""
    upgrade(bare_engine)
    return bare_engine


def describe_schema(engine: Engine) -> dict[str, object]:
    """Everything reflection tells of a state database's tables and views, and the
    migrations' rows (``alembic_version``)."""
    found = inspect(engine)
    database = engine.url.database or ""
    tables: dict[str, object] = {}
    for name in sorted(found.get_table_names()):
        columns = [
            (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
            for c in found.get_columns(name)
        ]
        indexes = sorted(
            (str(i["name"]), tuple(map(str, i["column_names"])), bool(i["unique"]))
            for i in found.get_indexes(name)
        )
        keys = sorted(
            (
                tuple(k["constrained_columns"]),
                k["referred_table"],
                tuple(k["referred_columns"]),
                str(k.get("options")),
            )
            for k in found.get_foreign_keys(name)
        )
        uniques = sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(name))
        checks = sorted(str(c["sqltext"]) for c in found.get_check_constraints(name))
        primary = found.get_pk_constraint(name)["constrained_columns"]
        tables[name] = (columns, indexes, keys, uniques, checks, primary)
    views = {
        name: str(found.get_view_definition(name)).replace(f"`{database}`.", "")
        for name in sorted(found.get_view_names())
    }
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return {"tables": tables, "views": views, "alembic_version": version}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mariadb"])
def test_a_test_template_is_the_migrated_schema(kind: str, tmp_path: Path) -> None:
    """The other test modules' state DBs are copies of one real upgrade per process
    (``tests/state_templates.py``): a copy is exactly what a real upgrade makes."""
    with (
        fresh_state_url(kind, tmp_path / "first") as first_url,
        fresh_state_url(kind, tmp_path / "copy") as copy_url,
        fresh_state_url(kind, tmp_path / "real") as real_url,
    ):
        engines = [make_state_engine(url) for url in (first_url, copy_url, real_url)]
        try:
            state_templates.migrate(engines[0])  # the real upgrade, if none ran here yet
            state_templates.migrate(engines[1])  # a copy
            upgrade(engines[2])
            copied, real = describe_schema(engines[1]), describe_schema(engines[2])
            assert copied["tables"] and copied["views"]
            assert copied == real
            assert schema_diff(engines[1]) == []
        finally:
            for engine in engines:
                engine.dispose()


def test_upgrade_downgrade_upgrade(bare_engine: Engine) -> None:
    assert current_revision(bare_engine) is None
    upgrade(bare_engine)
    assert current_revision(bare_engine) == head_revision()
    assert set(inspect(bare_engine).get_table_names()) >= TABLES
    downgrade(bare_engine, "base")
    assert current_revision(bare_engine) is None
    assert not TABLES & set(inspect(bare_engine).get_table_names())
    upgrade(bare_engine)
    assert current_revision(bare_engine) == head_revision()


def schema_diff(engine: Engine) -> list[object]:
    """What Alembic's autogenerate finds between the models and the database."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": compare_column_type})
        return list(compare_metadata(context, Base.metadata))


def _modified_columns(diffs: list[object]) -> list[object]:
    """The column changes (type, collation, nullability) among autogenerate's differences."""
    changes = [d for diff in diffs for d in (diff if isinstance(diff, list) else [diff])]
    return [c for c in changes if isinstance(c, tuple) and str(c[0]).startswith("modify_")]


def test_models_and_migrations_agree(state_engine: Engine) -> None:
    assert schema_diff(state_engine) == []


def test_0007_gives_mysql_binary_ids_and_microseconds(state_engine: Engine) -> None:
    """Revision 0007 alters MySQL/MariaDB columns made by earlier revisions (no-op elsewhere),
    and can run again over a half-altered schema (MySQL commits each ALTER at once)."""
    downgrade(state_engine, "0006")
    mysql = state_engine.dialect.name in ("mysql", "mariadb")
    # Later revisions' tables and columns are missing now; 0007 is about column types.
    assert bool(_modified_columns(schema_diff(state_engine))) is mysql
    if mysql:
        with state_engine.begin() as connection:  # as if a killed 0007 had altered one table
            connection.execute(text("ALTER TABLE runs MODIFY started_at DATETIME(6) NOT NULL"))
    upgrade(state_engine)
    assert schema_diff(state_engine) == []


def test_indexes_for_delivery_and_user_lookup(state_engine: Engine) -> None:
    indexes = {
        ix["name"]: ix["column_names"] for ix in inspect(state_engine).get_indexes("memberships")
    }
    assert indexes["ix_memberships_delivery"][:3] == ["audience_id", "destination", "status"]
    assert indexes["ix_memberships_member_id"] == ["member_id"]


def test_out_of_date_schema_is_refused_with_the_command_to_run(bare_engine: Engine) -> None:
    with pytest.raises(SchemaOutOfDateError, match="run `audience-sync db upgrade`"):
        require_current_schema(bare_engine)
    assert schema_status(bare_engine).state == "empty"
    upgrade(bare_engine)
    require_current_schema(bare_engine)
    with bare_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    assert schema_status(bare_engine).state == "ahead"
    with pytest.raises(SchemaTooNewError, match="upgrade audience-sync"):
        require_current_schema(bare_engine)


def test_installation_id_is_created_once(state_engine: Engine) -> None:
    with state_engine.begin() as connection:
        first = installation_id(connection)
    with state_engine.begin() as connection:
        assert installation_id(connection) == first
    assert len(first) == 16


def test_timestamps_come_back_aware_in_utc(state_engine: Engine) -> None:
    moment = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    with Session(state_engine) as session:
        session.add(Audience(key="k", name="K", definition_hash="h", created_at=moment))
        session.commit()
    with Session(state_engine) as session:
        stored = session.query(Audience).one().created_at
    assert stored == moment and stored.tzinfo is not None
    assert stored.utcoffset() == UTC.utcoffset(None)


def test_timestamps_keep_microseconds(state_engine: Engine) -> None:
    """Run durations under a second must not read 0.0 s (MySQL's DATETIME drops fractions)."""
    started = datetime(2026, 3, 29, 1, 30, 0, 123456, tzinfo=UTC)
    with Session(state_engine) as session:
        audience = Audience(key="k", name="K", definition_hash="h", created_at=started)
        session.add(audience)
        session.flush()
        session.add(
            Run(
                audience_id=audience.id,
                trigger="manual",
                status="succeeded",
                started_at=started,
                finished_at=started + timedelta(seconds=0.25),
            )
        )
        session.commit()
    with Session(state_engine) as session:
        run = session.query(Run).one()
    assert run.started_at == started
    assert run.finished_at is not None
    assert (run.finished_at - run.started_at).total_seconds() == 0.25


def test_naive_timestamps_are_refused(state_engine: Engine) -> None:
    with Session(state_engine) as session:
        session.add(
            Audience(key="k", name="K", definition_hash="h", created_at=datetime(2026, 1, 1))
        )
        with pytest.raises(Exception, match="naive datetime"):
            session.commit()


def test_sqlite_is_set_up_for_a_daemon_and_a_manual_command(tmp_path) -> None:
    engine = make_state_engine(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    finally:
        engine.dispose()


def test_read_only_commands_do_not_create_a_missing_sqlite_file(tmp_path) -> None:
    with pytest.raises(StateDatabaseMissingError, match="db upgrade"):
        make_state_engine(f"sqlite:///{tmp_path / 'missing.db'}", must_exist=True)
    assert not (tmp_path / "missing.db").exists()


def test_0009_completes_over_a_half_done_upgrade(state_engine: Engine) -> None:
    """MySQL/MariaDB commit each ALTER at once: a killed 0009 may have added ``value`` but not
    ``synced_value``; upgrading again completes it (hostile review)."""
    downgrade(state_engine, "0008")
    with state_engine.begin() as connection:
        connection.execute(text("ALTER TABLE memberships ADD COLUMN value TEXT"))
    upgrade(state_engine)
    assert current_revision(state_engine) == head_revision()
    columns = {c["name"] for c in inspect(state_engine).get_columns("memberships")}
    assert {"value", "synced_value"} <= columns and "synced" not in columns


def test_0015_turns_stored_null_traits_into_sql_null(state_engine: Engine) -> None:
    """No extra traits is SQL NULL on every state DB: 0015 converts the JSON text ``null``
    that MariaDB/MySQL state DBs stored before (other DBs never held it, and keep their rows)."""
    downgrade(state_engine, "0014")
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with state_engine.begin() as connection:
        connection.execute(
            insert(AUDIENCES).values(id=1, key="k", name="K", definition_hash="h", created_at=now)
        )
        connection.execute(  # the stored texts as they are, not as a JSON column binds them
            text(
                "INSERT INTO memberships (audience_id, destination, id_kind, member_id, desired,"
                " value, version, changed_at, traits, status, attempts) VALUES (1, 'segment',"
                " 'user', :member, true, 'true', 1, :now, :traits, 'pending', 0)"
            ),
            [
                {"member": "none", "now": now, "traits": "null"},
                {"member": "some", "now": now, "traits": '{"plan": "pro"}'},
            ],
        )
        connection.execute(
            text(
                "INSERT INTO deliveries (message_id, message_type, batch_id, audience_id,"
                " destination, id_kind, member_id, value, traits, version, outcome, sent_at)"
                " VALUES ('m', 'identify', 'b', 1, 'segment', 'user', 'none', 'true', 'null', 1,"
                " 'acknowledged', :now)"
            ),
            {"now": now},
        )
    upgrade(state_engine, "0015")
    mysql = state_engine.dialect.name in ("mysql", "mariadb")
    with state_engine.connect() as connection:
        query = select(MEMBERSHIPS.c.member_id, cast(MEMBERSHIPS.c.traits, Text))
        traits = dict(connection.execute(query).tuples().all())
        logged = connection.execute(text("SELECT traits FROM deliveries")).scalar()
    assert traits["none"] is None if mysql else traits["none"] == "null"
    assert json.loads(traits["some"]) == {"plan": "pro"}
    assert logged is None if mysql else logged == "null"


# Rows of the ledger's `deliveries` table as 0012-0017 kept it (one per message).
OLD_LEDGER_ROWS = [
    {
        "id": 5,
        "message_id": "as-1-v1",
        "message_type": "identify",
        "member_id": 'Müller "q" \\ 😀',
        "value": "true",
        "traits": '{"plan": "pro", "n": 1.5}',
        "outcome": "acknowledged",
        "reason": None,
        "http_status": None,
        "acked": True,
    },
    {
        "id": 6,
        "message_id": "as-2-v3",
        "message_type": "track",
        "member_id": "b",
        "value": "false",
        "traits": None,
        "outcome": "rejected",
        "reason": 'HTTP 400: it\'s "bad"',
        "http_status": 400,
        "acked": False,
    },
    {
        "id": 9,
        "message_id": "as-3-v2",
        "message_type": "identify",
        "member_id": "c",
        "value": '{"plan":"pro","seats":[1,2]}',
        "traits": None,
        "outcome": "unknown",
        "reason": "HTTP 502",
        "http_status": 502,
        "acked": False,
    },
]


def _ledger(engine: Engine, order: str) -> list[dict[str, object]]:
    """The ledger's rows as the `deliveries` table or view gives them, values decoded."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT message_id, message_type, member_id, value, traits, outcome, reason, "
                f"http_status, acknowledged_at, version, batch_id FROM deliveries ORDER BY {order}"
            )
        ).mappings()
        return [
            {
                **row,
                "value": json.loads(row["value"]),
                "traits": None if row["traits"] is None else json.loads(row["traits"]),
                "acknowledged_at": row["acknowledged_at"] is not None,
            }
            for row in rows
        ]


def test_0018_keeps_the_ledger_rows_and_their_ids(state_engine: Engine) -> None:
    """0018 stores the ledger per batch: rows recorded before it read the same through the
    `deliveries` view, keep their ids (`runs.ledger_from` points at them), new rows are
    numbered after them, and a downgrade expands them back into a table."""
    downgrade(state_engine, "0017")
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with state_engine.begin() as connection:
        connection.execute(
            insert(AUDIENCES).values(id=1, key="k", name="K", definition_hash="h", created_at=now)
        )
        connection.execute(
            text(
                "INSERT INTO deliveries (id, message_id, message_type, batch_id, audience_id,"
                " destination, id_kind, member_id, value, traits, version, outcome, reason,"
                " http_status, sent_at, acknowledged_at) VALUES (:id, :message_id,"
                " :message_type, 'b', 1, 'segment', 'user', :member_id, :value, :traits, 2,"
                " :outcome, :reason, :http_status, :now, :acked_at)"
            ),
            [
                {**row, "now": now, "acked_at": now if row["acked"] else None}
                for row in OLD_LEDGER_ROWS
            ],
        )
    expected = [
        {
            **{k: v for k, v in row.items() if k not in ("id", "acked")},
            "value": json.loads(str(row["value"])),
            "traits": None if row["traits"] is None else json.loads(str(row["traits"])),
            "acknowledged_at": row["acked"],
            "version": 2,
            "batch_id": "b",
        }
        for row in OLD_LEDGER_ROWS
    ]
    upgrade(state_engine)
    assert _ledger(state_engine, "id, position") == expected
    with state_engine.begin() as connection:
        ids = connection.execute(text("SELECT id FROM deliveries ORDER BY id")).scalars().all()
        assert ids == [5, 6, 9]
        new = connection.execute(
            insert(DELIVERY_BATCHES).values(
                batch_id="n",
                audience_id=1,
                destination="segment",
                outcome="acknowledged",
                sent_at=now,
                acknowledged_at=now,
                member_count=1,
                messages='[["as-4-v1","identify","user","d",1,true,null]]',
            )
        ).inserted_primary_key[0]
    assert new > 9
    downgrade(state_engine, "0017")
    assert [row["member_id"] for row in _ledger(state_engine, "id")] == [
        'Müller "q" \\ 😀',
        "b",
        "c",
        "d",
    ]
    assert _ledger(state_engine, "id")[:3] == expected
    upgrade(state_engine)
    assert len(_ledger(state_engine, "id, position")) == 4


@pytest.mark.parametrize(
    ("mariadb", "version", "refused"),
    [(True, (10, 5, 9), True), (True, (10, 6, 0), False), (False, (8, 0, 3), True),
     (False, (8, 0, 36), False)],
)  # fmt: skip
def test_0018_refuses_a_server_without_json_table(
    mariadb: bool, version: tuple[int, ...], refused: bool
) -> None:
    """The `deliveries` view needs JSON_TABLE: an older MariaDB/MySQL is refused before 0018
    changes anything, with the server's version and what it needs."""
    from importlib.util import module_from_spec, spec_from_file_location

    from sqlalchemy.dialects.mysql.pymysql import MySQLDialect_pymysql

    from sync.errors import StateError

    path = Path(__file__).parent.parent / "migrations" / "versions" / "0018_ledger_per_batch.py"
    spec = spec_from_file_location("migration_0018", path)
    assert spec is not None and spec.loader is not None
    migration = module_from_spec(spec)
    spec.loader.exec_module(migration)
    dialect = MySQLDialect_pymysql()
    dialect.server_version_info = version
    dialect.is_mariadb = mariadb
    if not refused:
        migration._require_json_table(dialect)
        return
    with pytest.raises(StateError, match=r"needs (MariaDB 10\.6|MySQL 8\.0\.4) or later"):
        migration._require_json_table(dialect)
