"""A sync set-up for tests: a SQLite warehouse we can change, a config, a real state DB."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from sync.config import Config, parse_config
from sync.engine import RunHooks, RunOptions, RunReport, Syncer
from sync.state.tables import MEMBERSHIPS, RUNS

WRITE_KEY = "wk_test_secret_123"


class Harness:
    """Owns a warehouse file and a config; runs syncs against ``engine``."""

    def __init__(
        self, tmp_path: Path, engine: Engine, receiver_url: str = "http://127.0.0.1:9"
    ) -> None:
        self.tmp_path = tmp_path
        self.engine = engine
        self.receiver_url = receiver_url
        self.warehouse = tmp_path / "warehouse.db"
        with sqlite3.connect(self.warehouse) as db:
            db.execute("CREATE TABLE members (user_id TEXT, email TEXT, anonymous_id TEXT)")
        self.audience = {
            "name": "High Value Users",
            "query": "SELECT user_id, email FROM members",
            "traits": ["email"],
            "destinations": ["segment"],
        }
        self.destinations: dict[str, dict[str, Any]] = {
            "segment": {
                "type": "segment",
                "write_key": WRITE_KEY,
                "endpoint": receiver_url,
                "timeout": 2,
                "batch_size": 100,
            }
        }
        self.defaults: dict[str, Any] = {
            "retry_initial_delay": "10ms",
            "retry_max_delay": "50ms",
            "delivery_time_budget": "20s",
        }
        self.source_url = f"sqlite:///{self.warehouse}"
        self.config_extra = ""  # raw TOML appended (extra tables, more audiences)
        self.state: dict[str, Any] = {}  # [state] settings besides the url
        self.hooks = RunHooks()  # fault drills: every run of `sync` calls them

    def set_members(self, rows: list[str | tuple[Any, ...]]) -> None:
        """Replace the warehouse's members: ids, or (user_id, email[, anonymous_id]) tuples."""
        with sqlite3.connect(self.warehouse) as db:
            db.execute("DELETE FROM members")
            for row in rows:
                if isinstance(row, str):
                    row = (row, f"{row}@example.com", None)
                db.execute("INSERT INTO members VALUES (?, ?, ?)", (*row, None, None)[:3])
        db.close()

    def config_text(self) -> str:
        lines = [f'[state]\nurl = "{self.engine.url.render_as_string(hide_password=False)}"']
        lines += [f"{k} = {_toml(v)}" for k, v in self.state.items()]
        lines.append(f'[sources.warehouse]\nurl = "{self.source_url}"\nchunk_size = 1000')
        for name, settings in self.destinations.items():
            lines.append(f"[destinations.{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in settings.items()]
        lines.append("[defaults]")
        lines += [f"{k} = {_toml(v)}" for k, v in self.defaults.items()]
        lines.append("[[audiences]]")
        lines.append('source = "warehouse"')
        lines += [f"{k} = {_toml(v)}" for k, v in self.audience.items()]
        return "\n".join(lines) + "\n" + self.config_extra

    def config(self) -> Config:
        return parse_config(self.config_text(), "test.toml", self.tmp_path, {})

    def write_config(self) -> Path:
        """The config as a file, for CLI tests."""
        path = self.tmp_path / "audience-sync.toml"
        path.write_text(self.config_text())
        return path

    def sync(self, **options: Any) -> RunReport:
        config = self.config()
        syncer = Syncer(config, self.engine, hooks=self.hooks)
        return syncer.sync(config.audiences[0], RunOptions(**options))

    def sync_named(self, name: str, **options: Any) -> RunReport:
        """Sync the audience or trait group ``name`` (from ``config_extra`` too)."""
        config = self.config()
        computation = config.find_audience(name)
        assert computation is not None, name
        return Syncer(config, self.engine, hooks=self.hooks).sync(
            computation, RunOptions(**options)
        )

    def warehouse_sql(self, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
        """Run statements (or (statement, parameters)) on the warehouse."""
        with sqlite3.connect(self.warehouse) as db:
            for statement in statements:
                if isinstance(statement, str):
                    db.execute(statement)
                else:
                    db.execute(*statement)
        db.close()

    def memberships(self, destination: str | None = None) -> dict[str, Any]:
        query = select(MEMBERSHIPS).order_by(MEMBERSHIPS.c.member_id)
        if destination is not None:
            query = query.where(MEMBERSHIPS.c.destination == destination)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return {row.member_id: row for row in rows}

    def runs(self) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(select(RUNS).order_by(RUNS.c.id)).all())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"""' + value + '"""' if "\n" in value else '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    raise TypeError(value)
