"""Configuration: one TOML file, validated once, all at once.

``load_config`` is the only place that reads TOML or the environment. Every problem is reported
with its TOML path (``audiences[2].schedule``) and what to write instead, in one ``ConfigError``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from sync.errors import ConfigError
from sync.keys import derive_key, key_problem, name_key_problem
from sync.schedule import Schedule, parse_duration, parse_schedule

DEFAULT_CONFIG_PATH = "audience-sync.toml"

# Segment HTTP Tracking API limits (segment.com/docs/connections/sources/catalog/libraries/
# server/http-api/#max-request-size): 500 KB per batch request, 32 KB per message, and the
# batch endpoint takes at most 2,500 messages.
SEGMENT_MAX_BATCH_MESSAGES = 2500
SEGMENT_MAX_BATCH_BYTES = 500 * 1024
SEGMENT_MAX_MESSAGE_BYTES = 32 * 1024

DestinationMode = Literal["identify", "track", "both"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _duration(value: Any) -> float:
    return parse_duration(value)


class StateConfig(_Model):
    """Where audience-sync keeps its own state."""

    url: str = "sqlite:///audience-sync.db"
    auto_upgrade: bool = False

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

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_sqlalchemy_url(value)


class _DestinationBase(_Model):
    mode: DestinationMode = "identify"
    space_id: str = ""
    namespace: str = ""


class _HttpDestination(_DestinationBase):
    batch_size: int = Field(default=500, gt=0, le=SEGMENT_MAX_BATCH_MESSAGES)
    max_batch_bytes: int = Field(
        default=SEGMENT_MAX_BATCH_BYTES, gt=1024, le=SEGMENT_MAX_BATCH_BYTES
    )
    timeout: float = Field(default=15.0, gt=0)
    concurrency: int = Field(default=4, gt=0, le=64)
    gzip: bool = False


class SegmentDestination(_HttpDestination):
    """Segment's HTTP Tracking API, or any collector that speaks it (RudderStack, ...)."""

    type: Literal["segment"]
    write_key: SecretStr
    endpoint: str = "https://api.segment.io"
    integrations: dict[str, Any] | None = None


class WishpondDestination(_HttpDestination):
    """Segment, routing only to Wishpond (see README: Wishpond is browser-only in Segment)."""

    type: Literal["wishpond"]
    write_key: SecretStr
    endpoint: str = "https://api.segment.io"
    merchant_id: str = ""
    tracking_key: SecretStr | None = None


class WebhookDestination(_HttpDestination):
    """POST JSON batches to any URL, signed with HMAC-SHA256 when a secret is set."""

    type: Literal["webhook"]
    url: str
    secret: SecretStr | None = None
    signature_header: str = "X-Audience-Sync-Signature"
    headers: dict[str, str] = Field(default_factory=dict)


class FileDestination(_DestinationBase):
    """Append one Segment-spec message per line to a local JSONL file."""

    type: Literal["file"]
    path: str
    batch_size: int = Field(default=1000, gt=0, le=100_000)


Destination = Annotated[
    SegmentDestination | WishpondDestination | WebhookDestination | FileDestination,
    Field(discriminator="type"),
]
DESTINATION_TYPES = ("segment", "wishpond", "webhook", "file")


class Defaults(_Model):
    """Settings every audience inherits unless it sets its own."""

    schedule: str = "15m"
    max_removal_ratio: float = Field(default=0.5, ge=0, le=1)
    guard_min_members: int = Field(default=100, ge=0)
    max_attempts: int = Field(default=5, gt=0)
    delivery_time_budget: Annotated[float, Field(gt=0)] = 600.0
    retry_initial_delay: float = Field(default=1.0, gt=0)
    retry_max_delay: float = Field(default=60.0, gt=0)

    _durations = field_validator(
        "delivery_time_budget", "retry_initial_delay", "retry_max_delay", mode="before"
    )(_duration)

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value


class AudienceConfig(_Model):
    """One audience: a query whose rows are its members, and where to send them."""

    name: str = Field(min_length=1)
    key: str | None = None
    source: str
    query: str
    traits: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(min_length=1)
    schedule: str | None = None
    max_removal_ratio: float | None = Field(default=None, ge=0, le=1)
    guard_min_members: int | None = Field(default=None, ge=0)
    enabled: bool = True
    allow_key_reuse: bool = False

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('the query is empty; write a SELECT returning a "user_id" column')
        return value

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


class Config(_Model):
    """The whole, validated configuration."""

    state: StateConfig = Field(default_factory=StateConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    audiences: list[AudienceConfig] = Field(default_factory=list)

    def schedule_of(self, audience: AudienceConfig) -> Schedule:
        """The audience's own schedule, or the default one."""
        return parse_schedule(audience.schedule or self.defaults.schedule)

    def max_removal_ratio_of(self, audience: AudienceConfig) -> float:
        """The share of members a run may remove before the guard stops it."""
        if audience.max_removal_ratio is not None:
            return audience.max_removal_ratio
        return self.defaults.max_removal_ratio

    def guard_min_members_of(self, audience: AudienceConfig) -> int:
        """Audiences smaller than this churn freely, unguarded."""
        if audience.guard_min_members is not None:
            return audience.guard_min_members
        return self.defaults.guard_min_members

    def find_audience(self, name_or_key: str) -> AudienceConfig | None:
        """The audience with this name or trait key, if any."""
        for audience in self.audiences:
            if name_or_key in (audience.name, audience.trait_key):
                return audience
        return None

    def secrets(self) -> list[str]:
        """Every secret value in the config, so logs and errors can redact them."""
        found: list[str] = []
        for destination in self.destinations.values():
            for value in destination.__dict__.values():
                if isinstance(value, SecretStr) and value.get_secret_value():
                    found.append(value.get_secret_value())
        urls = [self.state.url, *(s.url for s in self.sources.values())]
        for dest in self.destinations.values():
            if isinstance(dest, WebhookDestination):
                urls.append(dest.url)
        for url in urls:
            try:
                password = make_url(url).password
            except ArgumentError:
                password = None
            if password:
                found.append(str(password))
        return found


# --- loading -------------------------------------------------------------------------------

_ENV_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; one ``ConfigError`` lists every problem."""
    config_path = Path(path)
    shown = str(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            shown,
            [
                "config file not found; copy config.example.toml there, pass --config PATH "
                "or set AUDIENCE_SYNC_CONFIG"
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(shown, [f"cannot read the config file: {reason}"]) from None
    return parse_config(text, shown, config_path.resolve().parent, environ)


def parse_config(
    text: str,
    shown: str,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate config ``text``; relative SQLite and file paths resolve against ``base_dir``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    raw = _interpolate(raw, "", os.environ if environ is None else environ, problems)
    _resolve_paths(raw, base_dir)
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_describe(error) for error in exc.errors())
    problems.extend(_cross_reference_problems(raw))
    if problems or config is None:
        raise ConfigError(shown, _unique(problems))
    return config


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _interpolate(value: Any, where: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else k, environ, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", environ, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(
            f"{where}: environment variable {name} is not set; export it, or write "
            f"${{{name}:-default}} to give a default"
        )
        return ""

    return _ENV_REFERENCE.sub(substitute, value)


def _resolve_sqlite_url(url: Any, base_dir: Path) -> Any:
    if not isinstance(url, str) or not url.startswith("sqlite"):
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(base_dir / database)).render_as_string(hide_password=False)


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    state = raw.get("state")
    if isinstance(state, dict) and "url" in state:
        state["url"] = _resolve_sqlite_url(state["url"], base_dir)
    elif state is None or isinstance(state, dict):
        raw.setdefault("state", {})
        raw["state"]["url"] = _resolve_sqlite_url(StateConfig().url, base_dir)
    sources = raw.get("sources")
    if isinstance(sources, dict):
        for source in sources.values():
            if isinstance(source, dict) and "url" in source:
                source["url"] = _resolve_sqlite_url(source["url"], base_dir)
    destinations = raw.get("destinations")
    if isinstance(destinations, dict):
        for dest in destinations.values():
            path = dest.get("path") if isinstance(dest, dict) else None
            if isinstance(path, str) and not Path(path).is_absolute():
                dest["path"] = str(base_dir / path)


def _check_sqlalchemy_url(value: str) -> str:
    try:
        make_url(value)
    except ArgumentError:
        raise ValueError(
            f'not a database URL: "{value}"; write e.g. "sqlite:///state.db" or '
            '"postgresql+psycopg://user@host/db"'
        ) from None
    return value


def _toml_path(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    # A discriminated union puts the tag into the location: destinations.x.segment.write_key.
    if len(parts) >= 3 and parts[0] == "destinations" and parts[2] in DESTINATION_TYPES:
        del parts[2]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for model in (
        Config,
        StateConfig,
        SourceConfig,
        Defaults,
        AudienceConfig,
        SegmentDestination,
        WishpondDestination,
        WebhookDestination,
        FileDestination,
    ):
        names.update(model.model_fields)
    return names


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    where = _toml_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        close = difflib.get_close_matches(key, sorted(_all_field_names()), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else "; remove it"
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing; add {loc[-1]} = ..."
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag", "?")
        return f'{where}.type: unknown destination type "{tag}"; write one of: ' + ", ".join(
            DESTINATION_TYPES
        )
    if kind == "union_tag_not_found":
        return (
            f'{where}.type: required key is missing; add type = "file" (one of: '
            + ", ".join(DESTINATION_TYPES)
            + ")"
        )
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    got = error.get("input")
    if isinstance(got, str | int | float | bool | list) and kind != "value_error":
        return f"{where}: {message} (got {got!r})"
    return f"{where}: {message}"


def _cross_reference_problems(raw: dict[str, Any]) -> list[str]:
    """Checks that span sections; tolerant of a raw dict that failed type validation."""
    problems: list[str] = []
    raw_sources, raw_destinations = raw.get("sources"), raw.get("destinations")
    sources: dict[str, Any] = raw_sources if isinstance(raw_sources, dict) else {}
    destinations: dict[str, Any] = raw_destinations if isinstance(raw_destinations, dict) else {}
    audiences = raw.get("audiences")
    if not isinstance(audiences, list):
        return problems
    names: dict[str, int] = {}
    keys: dict[str, tuple[int, str]] = {}
    for index, audience in enumerate(audiences):
        if not isinstance(audience, dict):
            continue
        where = f"audiences[{index}]"
        name = audience.get("name")
        source = audience.get("source")
        if isinstance(source, str) and source not in sources:
            known = ", ".join(sorted(sources)) or "none defined"
            problems.append(
                f'{where}.source: no source named "{source}" (defined: {known}); add a '
                f"[sources.{source}] table with a url"
            )
        wanted = audience.get("destinations")
        if isinstance(wanted, list):
            for i, dest in enumerate(wanted):
                if isinstance(dest, str) and dest not in destinations:
                    known = ", ".join(sorted(destinations)) or "none defined"
                    problems.append(
                        f'{where}.destinations[{i}]: no destination named "{dest}" (defined: '
                        f"{known}); add a [destinations.{dest}] table"
                    )
                if isinstance(dest, str) and wanted.index(dest) != i:
                    problems.append(f'{where}.destinations[{i}]: "{dest}" is listed twice')
        if not isinstance(name, str) or not name:
            continue
        if name in names:
            problems.append(
                f'{where}.name: duplicate audience name "{name}" (also audiences[{names[name]}]); '
                "give each audience its own name"
            )
            continue
        names[name] = index
        key = audience.get("key")
        if key is None:
            if problem := name_key_problem(name):
                problems.append(f"{where}.name: {problem}")
                continue
            key = derive_key(name)
        if not isinstance(key, str):
            continue
        if key in keys:
            other_index, other_name = keys[key]
            problems.append(
                f'{where}: audiences "{other_name}" (audiences[{other_index}]) and "{name}" '
                f'both have the key "{key}"; set key = "..." on one of them'
            )
        else:
            keys[key] = (index, name)
        traits = audience.get("traits")
        if isinstance(traits, list) and key in traits:
            problems.append(
                f'{where}.traits: "{key}" is the audience key itself; remove it from traits'
            )
        for reserved in ("user_id", "anonymous_id"):
            if isinstance(traits, list) and reserved in traits:
                problems.append(
                    f'{where}.traits: "{reserved}" is the member id, not a trait; remove it'
                )
    return problems
