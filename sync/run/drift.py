"""Config drift: what the state DB remembers that the config no longer says.

The config is the source of truth for definitions, the state DB for what was delivered. Four
edits would otherwise leave a destination holding stale values without a word:

- a renamed audience derives a new key and leaves the old key ``true``: refused, naming both;
- an audience removed from the config (orphaned): warned about, or retired (``on_removed``);
- a destination dropped from an audience: warned about, naming ``retire --destination``;
- a destination whose endpoint changed under the same name: refused until ``sync --full``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import SecretStr
from sqlalchemy import Connection, Engine, insert, select, update

from sync.config import ComputationConfig, Config
from sync.destinations import DestinationSettings, FileSettings, WebhookSettings
from sync.redaction import is_secret_param
from sync.state.audiences import definition_hash, destinations_hash
from sync.state.tables import AUDIENCES as A
from sync.state.tables import DESTINATION_ENDPOINTS as E
from sync.state.tables import MEMBERSHIPS as M

logger = logging.getLogger("sync.drift")

# Ports an URL without one means (RFC 9110 §4.2): `https://h` and `https://h:443` are one place.
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _quoted(name: str) -> str:
    return shlex.quote(name)


# --- endpoints -------------------------------------------------------------------------------


def endpoint_text(settings: DestinationSettings, *, legacy: bool = False) -> str:
    """What identifies where a destination delivers: its type, scheme, host, port and path,
    and the query parameters that are not credentials (a proxy's `?tenant=acme` is a place),
    sorted.

    Never credentials: URL userinfo, credential-like query parameters (``access_token``,
    ``sig``, …), write keys and secrets are left out, so rotating a key is not an endpoint
    change (and only a hash of this text is stored). ``legacy``: the text fingerprints were
    made of before query parameters counted (and before a Segment path ending in
    ``/v1/batch`` was the same place as its base).
    """
    if isinstance(settings, FileSettings):
        return f"file {os.path.normpath(settings.path)}"
    url = _url_of(settings)
    try:
        parts = urlsplit(url.strip())
        scheme, netloc, path = parts.scheme.lower(), parts.netloc, parts.path
        params = sorted(p for p in parse_qsl(parts.query) if not is_secret_param(p[0]))
    except ValueError:  # e.g. an unbalanced "[": keep what follows the last "@", minus the query
        scheme, netloc, path = "", url.rpartition("@")[2].split("?")[0].split("#")[0], ""
        params = []
    host, port = _host_and_port(netloc.rpartition("@")[2].lower())
    port = port or _DEFAULT_PORTS.get(scheme, "")
    path = path.rstrip("/")
    if settings.type == "segment" and not legacy:  # the batch URL pasted whole: one place
        path = path.removesuffix("/v1/batch")
    text = f"{settings.type} {scheme}://{host}:{port}{path}"
    return f"{text}?{urlencode(params)}" if params and not legacy else text


def _url_of(settings: DestinationSettings) -> str:
    """Where an HTTP destination posts: a webhook's ``url``, an API's ``endpoint``."""
    if isinstance(settings, FileSettings):
        return ""
    return settings.url if isinstance(settings, WebhookSettings) else settings.endpoint


def _host_and_port(host_port: str) -> tuple[str, str]:
    if host_port.startswith("["):  # an IPv6 literal
        host, _, rest = host_port.partition("]")
        return host + "]", rest.removeprefix(":")
    host, _, port = host_port.partition(":")
    return host, port


def endpoint_fingerprint(settings: DestinationSettings, *, legacy: bool = False) -> str:
    """sha256 hex of ``endpoint_text``: what the state DB keeps per audience and destination.
    Today's are marked ("v2 "), so that one never equals a legacy fingerprint: adding a
    parameter to a URL recorded without any is a move, not a legacy match."""
    text = endpoint_text(settings, legacy=legacy)
    return hashlib.sha256((text if legacy else f"v2 {text}").encode("utf-8")).hexdigest()


# What besides the endpoint says who a destination delivers to and what it holds: two Segment
# destinations at api.segment.io with different write keys are two sources, two URLs that
# differ by a credential (`?access_token=…`, a user name) two tenants, and a track-only
# destination holds nothing an identify would undo.
_IDENTITY_FIELDS = (
    "write_key",
    "secret",
    "headers",
    "merchant_id",
    "tracking_key",
    "mode",
)


def same_place(one: DestinationSettings, other: DestinationSettings) -> bool:
    """Whether two configured destinations deliver to the same place: the same endpoint (a
    file's path; ``endpoint_text``, which leaves credentials out), the same credentials in the
    URL (user info, credential query parameters), write key, secret, headers and mode."""
    if endpoint_text(one) != endpoint_text(other):
        return False

    def identity(settings: DestinationSettings) -> list[Any]:
        values = [getattr(settings, name, None) for name in _IDENTITY_FIELDS]
        values = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in values]
        values = [_normalized(v) for v in values]
        return [*values, _url_credentials(settings)]

    return identity(one) == identity(other)


def _normalized(value: Any) -> Any:
    """A setting as it identifies a place: text without surrounding spaces, header names in
    lower case (HTTP's are case-insensitive)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {str(k).lower(): _normalized(v) for k, v in value.items()}
    return value


def _url_credentials(settings: DestinationSettings) -> tuple[str, list[tuple[str, str]]]:
    """The credentials a destination's URL carries: its user info and its credential query
    parameters (``endpoint_text`` leaves both out)."""
    if isinstance(settings, FileSettings):
        return "", []
    url = _url_of(settings)
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url, []
    userinfo = parts.netloc.rpartition("@")[0]
    params = sorted(p for p in parse_qsl(parts.query) if is_secret_param(p[0]))
    return userinfo, params


def twin_destination(config: Config, key: str, dropped: str) -> str | None:
    """A destination the computation ``key`` still lists that delivers where ``dropped`` (a
    destination it no longer lists, still configured) does: the destination was renamed."""
    return _listed_like(config, key, dropped, same_place)


def _listed_like(
    config: Config,
    key: str,
    dropped: str,
    alike: Callable[[DestinationSettings, DestinationSettings], bool],
) -> str | None:
    """The first destination the computation ``key`` still lists that is ``alike`` the
    configured destination ``dropped``, which it no longer lists."""
    computation = next((c for c in config.computations if c.trait_key == key), None)
    settings = config.destinations.get(dropped)
    if computation is None or settings is None:
        return None
    return next(
        (
            name
            for name in computation.destinations
            if name != dropped
            and name in config.destinations
            and alike(config.destinations[name], settings)
        ),
        None,
    )


def _same_endpoint(stored: str, settings: DestinationSettings) -> bool:
    """Whether a stored fingerprint is this endpoint's, or its legacy fingerprint (recorded
    before query parameters counted: an upgraded state DB; the next plan records today's)."""
    return stored in (endpoint_fingerprint(settings), endpoint_fingerprint(settings, legacy=True))


def endpoint_problems(
    connection: Connection, config: Config, audience: ComputationConfig
) -> list[str]:
    """One line per destination of ``audience`` whose endpoint differs from the one its rows
    were planned against (nothing recorded yet: nothing to compare)."""
    key = audience.trait_key
    audience_id = connection.execute(select(A.c.id).where(A.c.key == key)).scalar()
    if audience_id is None:
        return []
    return [
        f'{audience.label} "{key}": destination "{name}" now points at another endpoint than '
        "the one its members were sent to, which would get only later changes; run "
        f"`audience-sync sync {_quoted(key)} --full` to resend everything there, or give the "
        "new endpoint a new destination name"
        for name in moved_endpoints(connection, config, audience_id, audience.destinations)
    ]


def _stored_fingerprints(connection: Connection, audience_id: int) -> dict[str, str]:
    """Destination name -> the endpoint fingerprint the audience's rows there were sent to."""
    rows = connection.execute(
        select(E.c.destination, E.c.fingerprint).where(E.c.audience_id == audience_id)
    ).all()
    return {row.destination: row.fingerprint for row in rows}


def moved_endpoints(
    connection: Connection, config: Config, audience_id: int, names: list[str]
) -> list[str]:
    """Those of ``names`` whose configured endpoint differs from the one the audience's rows
    there were sent to."""
    stored = _stored_fingerprints(connection, audience_id)
    return [
        name
        for name in names
        if name in stored
        and name in config.destinations
        and not _same_endpoint(stored[name], config.destinations[name])
    ]


def record_endpoints(
    connection: Connection, config: Config, audience_id: int, names: list[str], now: datetime
) -> None:
    """Remember the endpoints a plan was made against (in the plan's transaction, so a crash
    before it commits leaves the old fingerprint and the refusal in place)."""
    stored = _stored_fingerprints(connection, audience_id)
    for name in names:
        fingerprint = endpoint_fingerprint(config.destinations[name])
        if name not in stored:
            connection.execute(
                insert(E).values(
                    audience_id=audience_id,
                    destination=name,
                    fingerprint=fingerprint,
                    recorded_at=now,
                )
            )
        elif stored[name] != fingerprint:
            connection.execute(
                update(E)
                .where(E.c.audience_id == audience_id, E.c.destination == name)
                .values(fingerprint=fingerprint, recorded_at=now)
            )


# --- renames ---------------------------------------------------------------------------------


def rename_problem(
    connection: Connection, config: Config, audience: ComputationConfig
) -> str | None:
    """Why ``audience`` looks like a vanished audience renamed, or None.

    Only an audience the state DB does not know yet can be a rename; it is one when a
    non-retired audience that left the config had the same source, query and traits
    (``definition_hash``) and the same destinations (unknown for rows older than 0008).
    """
    key = audience.trait_key
    sources = rename_sources(connection, config, audience)
    if sources:
        old = sources[0]
        if audience.is_trait_group:
            return (
                f'trait group "{audience.name}" looks like "{old}" renamed (same source, query '
                f'and destinations): it would send its values under the new key "{key}" and '
                f'leave "{old}" orphaned; set key = "{old}" on it to keep the old key, or run '
                f"`audience-sync retire {_quoted(old)}` first"
            )
        return (
            f'audience "{audience.name}" looks like "{old}" renamed (same source, query, traits '
            f'and destinations): it would send true under the new key "{key}" and leave "{old}" '
            f'true at its destinations; set key = "{old}" on it to keep the old key, or run '
            f"`audience-sync retire {_quoted(old)} --send-false` first"
        )
    return None


def rename_sources(
    connection: Connection, config: Config, audience: ComputationConfig
) -> list[str]:
    """The keys of every vanished audience ``audience`` looks like a rename of, in key order
    (two copies of one definition renamed in one edit both match each new name)."""
    if connection.execute(select(A.c.id).where(A.c.key == audience.trait_key)).first():
        return []
    configured = {a.trait_key for a in config.computations}
    digest, destinations = definition_hash(audience), destinations_hash(audience)
    rows = connection.execute(
        select(A.c.key, A.c.definition_hash, A.c.destinations_hash)
        .where(A.c.retired_at.is_(None))
        .order_by(A.c.key)
    ).all()
    return [
        str(row.key)
        for row in rows
        if row.key not in configured
        and row.definition_hash == digest
        and row.destinations_hash in (None, destinations)
    ]


def drift_problem(
    connection: Connection, config: Config, audience: ComputationConfig, *, full: bool
) -> str | None:
    """Why ``audience`` must not run as configured (a rename; a moved endpoint, unless this is
    the ``--full`` run that accepts it), or None."""
    problem = rename_problem(connection, config, audience)
    if problem is None and not full:
        problem = next(iter(endpoint_problems(connection, config, audience)), None)
    return problem


# --- orphans and dropped destinations --------------------------------------------------------


@dataclass(frozen=True)
class Orphan:
    """An audience in the state DB, not retired, that the config no longer has."""

    audience_id: int
    key: str
    name: str
    kind: str = "audience"


def orphans(connection: Connection, config: Config) -> list[Orphan]:
    """Audiences removed from the config and not retired, by key."""
    configured = {a.trait_key for a in config.computations}
    rows = connection.execute(
        select(A.c.id, A.c.key, A.c.name, A.c.kind)
        .where(A.c.retired_at.is_(None))
        .order_by(A.c.key)
    ).all()
    return [
        Orphan(row.id, row.key, row.name, row.kind) for row in rows if row.key not in configured
    ]


def recorded_destinations(connection: Connection, audience_id: int) -> list[str]:
    """The destinations an audience has membership rows for.

    One index seek per destination (the delivery index leads with audience and destination)
    rather than a DISTINCT over every member: this runs before every sync.
    """
    found: list[str] = []
    while True:
        query = select(M.c.destination).where(M.c.audience_id == audience_id)
        if found:
            query = query.where(M.c.destination > found[-1])
        name = connection.execute(query.order_by(M.c.destination).limit(1)).scalar()
        if name is None:
            return found
        found.append(name)


def dropped_destinations(connection: Connection, config: Config) -> list[tuple[str, str]]:
    """(key, destination) pairs: a configured audience with rows at a destination it no longer
    lists."""
    rows = connection.execute(select(A.c.key, A.c.id).where(A.c.retired_at.is_(None))).all()
    ids: dict[str, int] = {row.key: row.id for row in rows}
    found = []
    for audience in config.computations:
        audience_id = ids.get(audience.trait_key)
        if audience_id is None:
            continue
        for name in recorded_destinations(connection, audience_id):
            if name not in audience.destinations:
                found.append((audience.trait_key, name))
    return found


def drift_warnings(connection: Connection, config: Config, *, warn_orphans: bool) -> list[str]:
    """One line per orphaned audience (when ``warn_orphans``) and per dropped destination, each
    naming the command that ends it."""
    lines = []
    tail = (
        ' (the next `audience-sync sync` or `run` does it: on_removed = "retire")'
        if config.defaults.on_removed == "retire"
        else ', or set [defaults] on_removed = "retire"'
    )
    if warn_orphans:
        for orphan in orphans(connection, config):
            key = _quoted(orphan.key)
            label, flag, what = (
                ("trait group", "--send-null", "nulls")
                if orphan.kind == "trait"
                else ("audience", "--send-false", "false")
            )
            lines.append(
                f'{label} "{orphan.key}" was removed from the config but its members keep '
                f"their values at its destinations; run `audience-sync retire {key} "
                f"{flag}` to send them {what}{tail}"
            )
    configured = {c.trait_key: c for c in config.computations}
    for key, name in dropped_destinations(connection, config):
        group = configured[key].is_trait_group
        label, flag = ("trait group", "--send-null") if group else ("audience", "--send-false")
        if twin := twin_destination(config, key, name):
            lines.append(
                f'{label} "{key}" no longer lists destination "{name}", which delivers where '
                f'"{twin}" does (a renamed destination?); run `audience-sync retire '
                f'{_quoted(key)} --destination {_quoted(name)}` to hand its rows to "{twin}"'
            )
            continue
        line = (
            f'{label} "{key}" no longer lists destination "{name}", which still holds its '
            f"values; run `audience-sync retire {_quoted(key)} --destination {_quoted(name)} "
            f"{flag}`"
        )
        if sibling := _sibling_destination(config, key, name):
            # Another source or tenant at one endpoint, or the same one with a rotated key:
            # only the operator knows, and the flag would undo the sibling's values if it is.
            line += (
                f'; but "{name}" has the endpoint of "{sibling}" with other credentials: if '
                f'"{sibling}" is "{name}" with a rotated key, run it without {flag} ({flag} '
                f'would reach the members "{sibling}" sent their values)'
            )
        lines.append(line)
    return lines


def _sibling_destination(config: Config, key: str, dropped: str) -> str | None:
    """A destination the computation ``key`` still lists at the endpoint of ``dropped`` (a
    destination it no longer lists, still configured) with other credentials."""
    return _listed_like(
        config, key, dropped, lambda one, other: endpoint_text(one) == endpoint_text(other)
    )


def warn_about_drift(engine: Engine, config: Config, *, warn_orphans: bool) -> None:
    """Log each drift warning once (a `sync`, or the start of `run`)."""
    with engine.connect() as connection:
        lines = drift_warnings(connection, config, warn_orphans=warn_orphans)
    for line in lines:
        logger.warning("%s", line)


def drift_report(engine: Engine, config: Config) -> tuple[list[str], list[str]]:
    """What `check` shows: problems that stop audiences, and warnings."""
    with engine.connect() as connection:
        problems = [
            problem
            for audience in config.computations
            if (problem := drift_problem(connection, config, audience, full=False))
        ]
        warnings = drift_warnings(connection, config, warn_orphans=True)
        connection.rollback()
    return problems, warnings
