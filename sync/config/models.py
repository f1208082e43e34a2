"""The configuration's shape: frozen pydantic models, one per TOML table (see sync.config)."""

from __future__ import annotations

import json
import math
import shlex
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from sync.config.listen import DEFAULT_HTTP_ADDRESS, check_http_setting
from sync.destinations import DestinationSettings
from sync.destinations.http import check_http_url
from sync.keys import derive_key, key_problem
from sync.messages import ComputationClass as ComputationKind
from sync.redaction import Redactor, collect_secrets
from sync.rules import SchemaMapping
from sync.schedule import Schedule, parse_duration, parse_schedule

DEFAULT_CONFIG_PATH = "audience-sync.toml"

# What `sync` and `run` do about an audience removed from the config (see sync.run.drift).
OnRemoved = Literal["warn", "retire"]


def _check_sqlalchemy_url(value: str) -> str:
    try:
        make_url(value)
    except ArgumentError:
        raise ValueError(
            f'not a database URL: "{value}"; write e.g. "sqlite:///state.db" or '
            '"postgresql+psycopg://user@host/db"'
        ) from None
    return value


# The state DB's `destination` columns are VARCHAR(100) (a name is part of every row's key).
MAX_DESTINATION_NAME_LENGTH = 100


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _duration(value: Any) -> float:
    return parse_duration(value)


class StateConfig(_Model):
    """Where audience-sync keeps its own state."""

    url: str = "sqlite:///audience-sync.db"
    auto_upgrade: bool = False
    # How long the delivery ledger keeps a sent message's row (`sync` and the daemon prune).
    keep_deliveries: Annotated[float, Field(gt=0)] = 30 * 86_400.0
    # Whether every message sent is recorded in the ledger (`delivery_batches`, read through the
    # view `deliveries`; README "Delivery ledger": what it costs). Off, acknowledgements and
    # in-doubt rows work as before; nothing is logged.
    delivery_ledger: bool = True

    _durations = field_validator("keep_deliveries", mode="before")(_duration)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_sqlalchemy_url(value)


class SourceConfig(_Model):
    """A database that audience queries run on."""

    url: str
    chunk_size: int = Field(default=10_000, gt=0, le=1_000_000)
    # The SQLite file is audience-sync's demo warehouse: created (by `demo`, `sync`, `run`)
    # when missing, so the example config works on a fresh clone.
    demo: bool = False
    # Rules measure time windows against "now": CURRENT_TIMESTAMP, or this query's one value
    # (a frozen or simulated clock, e.g. the demo's demo_clock table).
    now_query: str | None = Field(default=None, min_length=1)
    # Where rules find Segment's tables and columns (README "Rules").
    schema_mapping: SchemaMapping = Field(default_factory=SchemaMapping, alias="schema")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_sqlalchemy_url(value)


class Defaults(_Model):
    """Settings every audience inherits unless it sets its own."""

    schedule: str = "15m"
    max_removal_ratio: float = Field(default=0.5, ge=0, le=1)
    guard_min_members: int = Field(default=100, ge=0)
    max_attempts: int = Field(default=5, gt=0)
    delivery_time_budget: Annotated[float, Field(gt=0)] = 600.0
    retry_initial_delay: float = Field(default=1.0, gt=0)
    retry_max_delay: float = Field(default=60.0, gt=0)
    max_connection_failures: int = Field(default=5, gt=0)
    on_removed: OnRemoved = "warn"
    # The time zone of cron schedules (an IANA name); intervals do not depend on it.
    timezone: str = "UTC"

    _durations = field_validator(
        "delivery_time_budget", "retry_initial_delay", "retry_max_delay", mode="before"
    )(_duration)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f'unknown time zone "{value}"; write an IANA name such as "Europe/Paris" or "UTC"'
            ) from None
        return value

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value


class DaemonConfig(_Model):
    """How `audience-sync run` schedules work."""

    workers: int = Field(default=4, gt=0, le=64)
    sweep_interval: float = Field(default=60.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, gt=0)
    jitter: float = Field(default=0.0, ge=0)
    run_on_start: bool = True
    lease_seconds: float = Field(default=60.0, ge=5)
    # /metrics, /healthz, /readyz and the status page (sync.monitor); "" turns them off.
    http: str = DEFAULT_HTTP_ADDRESS

    _durations = field_validator(
        "sweep_interval", "shutdown_timeout", "jitter", "lease_seconds", mode="before"
    )(_duration)
    _http = field_validator("http", mode="before")(check_http_setting)


# What an alert tells of (README "Alerts"): a run that failed, was guarded (an unusual removal),
# was left partial, or a success after one of those.
AlertEvent = Literal["failed", "guarded", "partial", "recovered"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("failed", "guarded", "partial", "recovered")
# An alert's name and the computation keys it files under are `alerts_sent` keys: VARCHAR(100).
MAX_ALERT_NAME_LENGTH = 100
# An alert is sent after the run, before the next one: a slow receiver may hold a worker this
# long per alert, never longer.
MAX_ALERT_TIMEOUT_SECONDS = 30.0


class AlertConfig(_Model):
    """``[alerts.NAME]``: where to tell of failed, guarded, partial and recovered runs."""

    type: Literal["webhook", "slack"]
    # A secret whole (a Slack incoming webhook's token is its path): redacted everywhere.
    url: str
    on: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS), min_length=1)
    # Names or keys of audiences and trait groups; None: every computation.
    audiences: list[str] | None = Field(default=None, min_length=1)
    # A computation that keeps failing alerts once per interval (per alert and event).
    repeat: float = Field(default=3600.0, ge=0)
    timeout: float = Field(default=5.0, gt=0, le=MAX_ALERT_TIMEOUT_SECONDS)

    _url = field_validator("url")(check_http_url)
    _durations = field_validator("repeat", "timeout", mode="before")(_duration)

    def covers(self, computation: ComputationConfig) -> bool:
        """Whether this alert tells of ``computation`` (its name or key is listed, or none is)."""
        if self.audiences is None:
            return True
        return computation.name in self.audiences or computation.trait_key in self.audiences


OnExit = Literal["null", "keep"]


class AudienceDestinationSettings(_Model):
    """Per audience and destination: fields Engage puts into ``context.personas`` that some of
    Segment's audience destinations require (README "Destinations")."""

    external_audience_id: str | None = Field(default=None, min_length=1)
    audience_settings: dict[str, Any] | None = None

    @field_validator("audience_settings")
    @classmethod
    def _check_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (problem := _json_problem(value, "audience_settings")):
            raise ValueError(problem)
        return value


def _json_problem(value: Any, path: str) -> str | None:
    """Why ``value`` (from TOML) cannot go into a JSON message, naming where in it."""
    if isinstance(value, dict):
        for key, item in value.items():
            if problem := _json_problem(item, f"{path}.{key}"):
                return problem
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            if problem := _json_problem(item, f"{path}[{index}]"):
                return problem
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value}, which JSON cannot carry; write a finite number"
    if value is None or isinstance(value, str | int | float | bool):
        return None
    return (
        f"{path} is a TOML {type(value).__name__}, which JSON cannot carry; write it as a "
        'string (e.g. "2026-11-29T00:00:00Z")'
    )


class ComputationConfig(_Model):
    """What audiences and trait groups share: a query on a source, destinations, a schedule,
    the removal guard."""

    kind: ClassVar[ComputationKind]
    # How the configuration calls this kind of computation, in messages ("audience" …).
    label: ClassVar[str]

    name: str = Field(min_length=1)
    key: str | None = None
    source: str
    # Exactly one of the two: SQL, or rules compiled to SQL (sync.rules).
    query: str | None = None
    rules: dict[str, Any] | None = None
    destinations: list[str] = Field(min_length=1)
    schedule: str | None = None
    max_removal_ratio: float | None = Field(default=None, ge=0, le=1)
    guard_min_members: int | None = Field(default=None, ge=0)
    enabled: bool = True
    allow_key_reuse: bool = False

    @property
    def title(self) -> str:
        """How messages name it: ``audience "High Value Users"``, ``trait group "Plans"``."""
        return f'{self.label} "{self.name}"'

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError('the query is empty; write a SELECT returning a "user_id" column')
        return value

    @model_validator(mode="after")
    def _query_or_rules(self) -> ComputationConfig:
        if (self.query is None) == (self.rules is None):
            raise ValueError(
                'rules: give either query (SQL) or rules (README "Rules"), not both'
                if self.query is not None
                else 'query: required key is missing; add query = "SELECT ..." or a rules table'
            )
        return self

    @property
    def definition_text(self) -> str:
        """What defines the members (or values) apart from the source: the query, or the
        rules as canonical JSON."""
        if self.query is not None:
            return self.query.strip()
        return "rules:" + json.dumps(self.rules, sort_keys=True, separators=(",", ":"))

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value)
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None and (problem := key_problem(value)):
            raise ValueError(problem)
        return value

    @property
    def trait_key(self) -> str:
        """The configured key, or the one derived from the name."""
        return self.key or derive_key(self.name)

    @property
    def is_trait_group(self) -> bool:
        return self.kind == "trait"

    @property
    def extra_traits(self) -> list[str]:
        """Columns sent along as traits besides the computation's own value (audiences)."""
        return []

    def settings_for(self, destination: str) -> AudienceDestinationSettings:
        """This computation's own settings for one destination (none for trait groups)."""
        return NO_DESTINATION_SETTINGS


NO_DESTINATION_SETTINGS = AudienceDestinationSettings()


class AudienceConfig(ComputationConfig):
    """One audience: a query whose rows are its members, and where to send them."""

    kind: ClassVar[ComputationKind] = "audience"
    label: ClassVar[str] = "audience"

    traits: list[str] = Field(default_factory=list)
    destination_settings: dict[str, AudienceDestinationSettings] = Field(default_factory=dict)
    # Rules only: profiles known only by an anonymous id are members too (Engage leaves them
    # out by default).
    include_anonymous: bool = False

    @model_validator(mode="after")
    def _anonymous_with_rules(self) -> AudienceConfig:
        if self.include_anonymous and self.rules is None:
            raise ValueError(
                "include_anonymous is a setting of rules; a query returns anonymous_id itself"
            )
        return self

    @property
    def definition_text(self) -> str:
        text = super().definition_text
        return text + ",anonymous" if self.include_anonymous else text

    @property
    def extra_traits(self) -> list[str]:
        return self.traits

    def settings_for(self, destination: str) -> AudienceDestinationSettings:
        return self.destination_settings.get(destination, NO_DESTINATION_SETTINGS)


class TraitGroupConfig(ComputationConfig):
    """One SQL trait group: a query with one row per user; every column but the ids is a trait,
    sent when the row's values change."""

    kind: ClassVar[ComputationKind] = "trait"
    label: ClassVar[str] = "trait group"

    # A user who leaves the result: "null" sends every trait of the group as null once;
    # "keep" sends nothing.
    on_exit: OnExit = "null"


# The config file format this version reads; a file may say `version = N` at the top.
CONFIG_VERSION = 1


class Config(_Model):
    """The whole, validated configuration."""

    version: int = CONFIG_VERSION

    state: StateConfig = Field(default_factory=StateConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    destinations: dict[str, DestinationSettings] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    audiences: list[AudienceConfig] = Field(default_factory=list)
    traits: list[TraitGroupConfig] = Field(default_factory=list)
    alerts: dict[str, AlertConfig] = Field(default_factory=dict)
    # Values read from ${VAR}s into URLs and headers (set by `parse_config`).
    _environment_secrets: tuple[str, ...] = PrivateAttr(default=())
    # The path the config was loaded from, as given (set by `load_config`).
    _path: str | None = PrivateAttr(default=None)

    @field_validator("destinations")
    @classmethod
    def _check_destination_names(
        cls, value: dict[str, DestinationSettings]
    ) -> dict[str, DestinationSettings]:
        for name in value:
            if len(name) > MAX_DESTINATION_NAME_LENGTH:
                raise ValueError(
                    f'destination name "{name[:40]}…" is {len(name)} characters long; the '
                    f"state database keeps at most {MAX_DESTINATION_NAME_LENGTH}: shorten it"
                )
        return value

    @field_validator("alerts")
    @classmethod
    def _check_alert_names(cls, value: dict[str, AlertConfig]) -> dict[str, AlertConfig]:
        for name in value:
            if len(name) > MAX_ALERT_NAME_LENGTH:
                raise ValueError(
                    f'alert name "{name[:40]}…" is {len(name)} characters long; the state '
                    f"database keeps at most {MAX_ALERT_NAME_LENGTH}: shorten it"
                )
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value > CONFIG_VERSION:
            raise ValueError(
                f"this file is written for a newer audience-sync (config version {value}); "
                f"this one reads version {CONFIG_VERSION}: upgrade audience-sync"
            )
        if value < 1:
            raise ValueError(f"config version {value} does not exist; write version = 1")
        return value

    @property
    def computations(self) -> list[ComputationConfig]:
        """Every audience, then every trait group."""
        return [*self.audiences, *self.traits]

    def schedule_of(self, audience: ComputationConfig) -> Schedule:
        """The audience's own schedule, or the default one."""
        return parse_schedule(audience.schedule or self.defaults.schedule)

    def max_removal_ratio_of(self, audience: ComputationConfig) -> float:
        """The share of members a run may remove before the guard stops it."""
        if audience.max_removal_ratio is not None:
            return audience.max_removal_ratio
        return self.defaults.max_removal_ratio

    def guard_min_members_of(self, audience: ComputationConfig) -> int:
        """Audiences smaller than this churn freely, unguarded."""
        if audience.guard_min_members is not None:
            return audience.guard_min_members
        return self.defaults.guard_min_members

    def find_audience(self, name_or_key: str) -> ComputationConfig | None:
        """The audience or trait group with this name or key, if any."""
        for audience in self.computations:
            if name_or_key in (audience.name, audience.trait_key):
                return audience
        return None

    def command_line(self, *args: str) -> str:
        """The ``audience-sync`` command a hint tells the user to run, with ``--config`` when
        this config was not loaded from the default path (the user gave it)."""
        words = ["audience-sync"]
        if self._path is not None and self._path != DEFAULT_CONFIG_PATH:
            words += ["--config", self._path]
        return shlex.join([*words, *args])

    def secrets(self) -> list[str]:
        """Every secret value in the config (credential keys and headers, URL userinfo,
        values read from the environment into them), so logs, errors and state can hide them."""
        return [*collect_secrets(self.model_dump()), *self._environment_secrets]

    def redactor(self) -> Redactor:
        """A redactor hiding this config's secrets."""
        return Redactor(self.secrets())
