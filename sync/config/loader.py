"""Configuration: one TOML file, validated once, all at once.

``load_config`` is the only place that reads TOML or the environment. Every problem is reported
with its TOML path (``audiences[2].schedule``) and what to write instead, in one ``ConfigError``.
The models live in ``sync.config.models``; each destination type's settings beside its code in
``sync.destinations``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from sync.config.models import (
    AlertConfig,
    AudienceConfig,
    AudienceDestinationSettings,
    Config,
    DaemonConfig,
    Defaults,
    SourceConfig,
    StateConfig,
    TraitGroupConfig,
)
from sync.config.rules import rule_problems
from sync.destinations import DESTINATION_TYPES, SETTINGS_TYPES
from sync.errors import ConfigError
from sync.keys import derive_key, name_key_problem
from sync.redaction import (
    Redactor,
    collect_secrets,
    is_secret_path,
    is_secret_variable,
    is_sql_path,
)
from sync.rules import SchemaMapping

__all__ = ["load_config", "parse_config"]

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
                "config file not found; `audience-sync init` writes a commented one in the "
                "current folder, or pass --config PATH or set AUDIENCE_SYNC_CONFIG"
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(shown, [f"cannot read the config file: {reason}"]) from None
    config = parse_config(text, shown, config_path.resolve().parent, environ)
    config._path = shown
    return config


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
    # TOML path -> (text as written, text after ${VAR} interpolation)
    interpolated: dict[str, tuple[str, str]] = {}
    env = os.environ if environ is None else environ
    raw = _interpolate(raw, "", env, problems, interpolated)
    _resolve_paths(raw, base_dir)
    from_env = [
        (path, piece)
        for path, (written, resolved) in interpolated.items()
        # SQL: the values of variables named like credentials, not the whole query.
        for piece in (
            _variable_values(written, env, credentials_only=True)
            if is_sql_path(path)
            else (resolved, *_variable_values(written, env))
        )
    ]
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_describe(error, raw, interpolated) for error in exc.errors())
    problems.extend(_cross_reference_problems(raw))
    if config is not None and not problems:
        problems.extend(rule_problems(config))
    if problems or config is None:
        # Validators quote values (a bad URL, say): no secret of this file may be quoted.
        hide = Redactor(collect_secrets(raw, from_env))
        raise ConfigError(shown, [hide.redact(p) for p in _unique(problems)])
    config._environment_secrets = tuple(collect_secrets({}, from_env))
    return config


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _interpolate(
    value: Any,
    where: str,
    environ: Mapping[str, str],
    problems: list[str],
    interpolated: dict[str, tuple[str, str]],
) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else k, environ, problems, interpolated)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, f"{where}[{i}]", environ, problems, interpolated)
            for i, v in enumerate(value)
        ]
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

    resolved = _ENV_REFERENCE.sub(substitute, value)
    if _ENV_REFERENCE.search(value.replace("$$", "")):
        interpolated[where] = (value, resolved)
    return resolved


def _variable_values(
    written: str, environ: Mapping[str, str], *, credentials_only: bool = False
) -> tuple[str, ...]:
    """The values each ``${VAR}`` of a text was replaced with: a token read into a URL's
    path is a secret on its own, wherever the URL is shown in pieces. ``credentials_only``:
    only variables named like credentials (``is_secret_variable``)."""
    values = []
    for match in _ENV_REFERENCE.finditer(written):
        name, default = match.group(1), match.group(2)
        if name is not None and (is_secret_variable(name) or not credentials_only):
            value = environ.get(name, default)
            if value:
                values.append(value)
    return tuple(values)


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
    models: tuple[type[BaseModel], ...] = (
        Config,
        StateConfig,
        SourceConfig,
        AlertConfig,
        Defaults,
        DaemonConfig,
        AudienceConfig,
        AudienceDestinationSettings,
        TraitGroupConfig,
        SchemaMapping,
        *SETTINGS_TYPES,
    )
    for model in models:
        names.update(model.model_fields)
    return names


def _describe(error: Any, raw: dict[str, Any], interpolated: Mapping[str, tuple[str, str]]) -> str:
    loc = tuple(error["loc"])
    path = _toml_path(loc)
    written = interpolated.get(path, (None,))[0]
    where = path + _audience_named(loc, raw)
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        close = difflib.get_close_matches(key, sorted(_all_field_names()), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else "; remove it"
        if close and close[0] == key:  # a key of another table (e.g. audiences only)
            hint = " here (another table takes it); remove it"
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
    for field in ("query", "rules"):  # a computation's query-or-rules check names its key
        if message.startswith(f"{field}: "):
            where = f"{path}.{field}" + _audience_named(loc, raw)
            message = message.removeprefix(f"{field}: ")
    got = error.get("input")
    if written is not None:
        # Never the value read from the environment: it may be a secret in the wrong key.
        return f"{where}: {message} (got {written!r})"
    if is_secret_path(path):
        return f"{where}: {message} (got a {type(got).__name__})"
    if isinstance(got, str | int | float | bool | list) and kind != "value_error":
        return f"{where}: {message} (got {got!r})"
    return f"{where}: {message}"


# The config's lists of computations, and what a line about one of them calls it.
COMPUTATION_SECTIONS = {"audiences": "audience", "traits": "trait group"}


def _audience_named(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    """`` (audience "Name")`` for a problem inside ``audiences[i]`` (`` (trait group "Name")``
    inside ``traits[i]``), so the line names it."""
    if len(loc) < 2 or loc[0] not in COMPUTATION_SECTIONS or not isinstance(loc[1], int):
        return ""
    entries = raw.get(str(loc[0]))
    if not isinstance(entries, list) or loc[1] >= len(entries):
        return ""
    entry = entries[loc[1]]
    name = entry.get("name") if isinstance(entry, dict) else None
    label = COMPUTATION_SECTIONS[str(loc[0])]
    return f' ({label} "{name}")' if isinstance(name, str) and name else ""


def _cross_reference_problems(raw: dict[str, Any]) -> list[str]:
    """Checks that span sections; tolerant of a raw dict that failed type validation."""
    problems: list[str] = []
    raw_sources, raw_destinations = raw.get("sources"), raw.get("destinations")
    sources: dict[str, Any] = raw_sources if isinstance(raw_sources, dict) else {}
    destinations: dict[str, Any] = raw_destinations if isinstance(raw_destinations, dict) else {}
    # Names and keys: one namespace across audiences and trait groups.
    names: dict[str, str] = {}
    keys: dict[str, tuple[str, str]] = {}
    for section in COMPUTATION_SECTIONS:
        entries = raw.get(section)
        if not isinstance(entries, list):
            continue
        for index, audience in enumerate(entries):
            if not isinstance(audience, dict):
                continue
            where = f"{section}[{index}]"
            problems.extend(_reference_problems(where, audience, sources, destinations))
            problems.extend(_identity_problems(where, audience, names, keys))
    problems.extend(_carried_trait_problems(raw, keys))
    problems.extend(_alert_problems(raw.get("alerts"), names, keys))
    return problems


def _carried_trait_problems(raw: dict[str, Any], keys: Mapping[str, tuple[str, str]]) -> list[str]:
    """An audience's extra ``traits`` may not be another computation's key at a destination
    both send to: the destination would hold one value for two things (it flipped between
    ``true`` and the column's value as each ran)."""
    entries = {
        where: entry
        for section in COMPUTATION_SECTIONS
        if isinstance(raw.get(section), list)
        for index, entry in enumerate(raw[section])
        if isinstance(entry, dict) and (where := f"{section}[{index}]")
    }
    problems: list[str] = []
    for where, group in entries.items():
        if where.startswith("traits") and isinstance(group.get("rules"), dict):
            problems.extend(_rules_trait_problems(where, group, entries, keys))
    for where, audience in entries.items():
        traits = audience.get("traits")
        if where.startswith("traits") or not isinstance(traits, list):
            continue
        for trait in traits:
            other_where, other_name = _audience_key(keys, trait, where)
            if other_where is None:
                continue
            shared = _shared_destination(audience, entries[other_where])
            if shared is not None:
                problems.append(
                    f'{where}.traits: "{trait}" is also the key of audience "{other_name}" '
                    f'({other_where}) at destination "{shared}"; remove it from traits or set '
                    'key = "..." on one of them'
                )
    return problems


def _rules_trait_problems(
    where: str,
    group: dict[str, Any],
    entries: Mapping[str, dict[str, Any]],
    keys: Mapping[str, tuple[str, str]],
) -> list[str]:
    """A rules trait group's traits are its rules' names, known from the config: none may be
    an audience's key, or a trait an audience carries, at a destination both send to."""
    problems: list[str] = []
    for trait in group["rules"]:
        if not isinstance(trait, str):
            continue
        other_where, other_name = _audience_key(keys, trait, where)
        shared = _shared_destination(group, entries[other_where]) if other_where else None
        if shared is not None:
            problems.append(
                f'{where}.rules.{trait}: "{trait}" is also the key of audience '
                f'"{other_name}" ({other_where}) at destination "{shared}"; rename the rule'
            )
            continue
        for other_where, other in entries.items():
            carried = other.get("traits")
            if other_where.startswith("traits") or not isinstance(carried, list):
                continue
            if trait in carried and (shared := _shared_destination(group, other)) is not None:
                problems.append(
                    f'{where}.rules.{trait}: "{trait}" is also a trait audience '
                    f'"{other.get("name")}" ({other_where}) carries to destination "{shared}"; '
                    "rename the rule"
                )
                break
    return problems


def _audience_key(
    keys: Mapping[str, tuple[str, str]], trait: Any, where: str
) -> tuple[str | None, str]:
    """(where, name) of the audience other than ``where`` whose key is ``trait``; a trait
    group's key is no trait (it names the group in ``context.personas``)."""
    if not isinstance(trait, str) or trait not in keys:
        return None, ""
    other_where, other_name = keys[trait]
    if other_where == where or not other_where.startswith("audiences"):
        return None, ""
    return other_where, other_name


def _shared_destination(one: dict[str, Any], other: dict[str, Any]) -> str | None:
    """A destination both computations list, if any."""
    mine, theirs = one.get("destinations"), other.get("destinations")
    if not isinstance(mine, list) or not isinstance(theirs, list):
        return None
    return next((d for d in mine if isinstance(d, str) and d in theirs), None)


def _alert_problems(
    alerts: Any, names: Mapping[str, str], keys: Mapping[str, tuple[str, str]]
) -> list[str]:
    """An alert's ``audiences`` must name configured audiences or trait groups (names or keys)."""
    if not isinstance(alerts, dict):
        return []
    problems: list[str] = []
    for alert_name, alert in alerts.items():
        wanted = alert.get("audiences") if isinstance(alert, dict) else None
        if not isinstance(wanted, list):
            continue
        for i, entry in enumerate(wanted):
            if isinstance(entry, str) and entry not in names and entry not in keys:
                known = ", ".join(sorted(names)) or "none defined"
                close = difflib.get_close_matches(entry, [*names, *keys], n=1)
                hint = f'; did you mean "{close[0]}"?' if close else f" (defined: {known})"
                problems.append(
                    f"alerts.{alert_name}.audiences[{i}]: no audience or trait group named "
                    f'"{entry}"{hint}'
                )
    return problems


def _reference_problems(
    where: str, audience: dict[str, Any], sources: dict[str, Any], destinations: dict[str, Any]
) -> list[str]:
    """An audience's source and destinations must be defined, each destination listed once."""
    problems: list[str] = []
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
    per_destination = audience.get("destination_settings")
    if isinstance(per_destination, dict) and isinstance(wanted, list):
        for dest in per_destination:
            if dest not in wanted:
                problems.append(
                    f'{where}.destination_settings.{dest}: "{dest}" is not one of this '
                    f"audience's destinations ({', '.join(map(str, wanted))}); add it to "
                    "destinations or remove these settings"
                )
    return problems


def _identity_problems(
    where: str,
    audience: dict[str, Any],
    names: dict[str, str],
    keys: dict[str, tuple[str, str]],
) -> list[str]:
    """Names and keys are unique across audiences and trait groups (``names`` and ``keys``
    collect the ones seen so far), and a key is not also a trait or a member id."""
    name = audience.get("name")
    if not isinstance(name, str) or not name:
        return []
    if name in names:
        return [
            f'{where}.name: duplicate audience name "{name}" (also {names[name]}); '
            "give each audience and trait group its own name"
        ]
    names[name] = where
    key = audience.get("key")
    if key is None:
        if problem := name_key_problem(name):
            return [f"{where}.name: {problem}"]
        key = derive_key(name)
    if not isinstance(key, str):
        return []
    problems: list[str] = []
    if key in keys:
        other_where, other_name = keys[key]
        problems.append(
            f'{where}: "{other_name}" ({other_where}) and "{name}" '
            f'both have the key "{key}"; set key = "..." on one of them'
        )
    else:
        keys[key] = (where, name)
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
