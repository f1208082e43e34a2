"""Shared fixtures: real state databases (SQLite files, PostgreSQL schemas, MariaDB databases),
never mocks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from sync.state.db import make_state_engine
from tests.state_templates import migrate

if TYPE_CHECKING:
    from tests.harness import Harness
    from tests.receiver import Receiver

POSTGRES_ENV = "AUDIENCE_SYNC_TEST_POSTGRES_URL"
MYSQL_ENV = "AUDIENCE_SYNC_TEST_MYSQL_URL"
REPO = Path(__file__).resolve().parent.parent


def _base_url(env: str, what: str, example: str) -> str:
    """A test database URL from ``env``; required in CI, a skip elsewhere."""
    url = os.environ.get(env)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{env} must be set in CI (see .ci/run)")
    pytest.skip(f"{what} tests need {env}, e.g. {example}")


def postgres_base_url() -> str:
    """The PostgreSQL URL tests use; required in CI, a skip elsewhere."""
    return _base_url(POSTGRES_ENV, "PostgreSQL", "postgresql+psycopg://postgres@127.0.0.1/test")


def mysql_base_url() -> str:
    """The MariaDB/MySQL URL tests use; required in CI, a skip elsewhere."""
    return _base_url(
        MYSQL_ENV, "MariaDB", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
    )


def _with_search_path(base: str, schema: str) -> str:
    url = make_url(base)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@contextmanager
def fresh_postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, private schema (dropped afterwards)."""
    base = postgres_base_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield _with_search_path(base, schema)
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def fresh_mysql_database() -> Iterator[str]:
    """A MariaDB/MySQL URL on a fresh, private database (dropped afterwards)."""
    base = make_url(mysql_base_url())
    database = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE `{database}`"))
        query = {"charset": "utf8mb4", **base.query}
        yield base.set(database=database, query=query).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE `{database}`"))
    finally:
        admin.dispose()


@contextmanager
def fresh_state_url(kind: str, directory: Path) -> Iterator[str]:
    """An empty state database URL of ``kind`` (``sqlite``: a file in ``directory``)."""
    if kind == "sqlite":
        directory.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{directory / 'state.db'}"
    elif kind == "mariadb":
        with fresh_mysql_database() as url:
            yield url
    else:
        with fresh_postgres_schema() as url:
            yield url


@pytest.fixture(autouse=True)
def _no_unreachable_destinations() -> Iterator[None]:
    """Each test starts with no destination given up on by an earlier test in this worker
    (``sending``'s process-wide marks: one connection failure would then be enough)."""
    from sync.delivery import sending

    sending.forget_unreachable()
    yield


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, private schema (dropped afterwards)."""
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def mysql_database_url() -> Iterator[str]:
    """A MariaDB/MySQL URL on a fresh, private database (dropped afterwards)."""
    with fresh_mysql_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty state database URL, once on each supported state database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mysql_database_url"))
    return str(request.getfixturevalue("postgres_schema_url"))


@pytest.fixture
def bare_engine(state_url: str) -> Iterator[Engine]:
    """An engine on an empty state database; asserts no connection is left checked out."""
    engine = make_state_engine(state_url)
    yield engine
    checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
    engine.dispose()
    assert checked_out == 0, f"{checked_out} connection(s) left checked out"


@pytest.fixture
def state_engine(bare_engine: Engine) -> Engine:
    """An engine on a state database migrated to head (a copy of this process's first real
    upgrade on its kind of database: ``tests/state_templates.py``)."""
    migrate(bare_engine)
    return bare_engine


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real Segment-compatible receiver on 127.0.0.1 expecting the test write key."""
    from tests.harness import WRITE_KEY
    from tests.receiver import Receiver

    with Receiver(write_key=WRITE_KEY).running() as running:
        yield running


@pytest.fixture
def harness(tmp_path: Path, state_engine: Engine, receiver: Receiver) -> Harness:
    """A warehouse, a config pointing at the receiver, and a migrated state DB."""
    from tests.harness import Harness

    return Harness(tmp_path, state_engine, receiver.url)
