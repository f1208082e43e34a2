"""Computation rows (audiences and trait groups) in the state DB: creation (freezing the key),
lookups, retirement."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, delete, insert, select, update

from sync.config import ComputationConfig, Config
from sync.errors import AudienceSyncError, UnknownAudienceError
from sync.state.db import insert_ignoring_duplicates
from sync.state.memberships import adopt_destination
from sync.state.tables import AUDIENCES as A
from sync.state.tables import DELIVERY_PROGRESS as P
from sync.state.tables import DESTINATION_ENDPOINTS as E
from sync.state.tables import FALSE_VALUE, ComputationKind, utcnow
from sync.state.tables import MEMBERSHIPS as M
from sync.state.tables import RETIRED_DESTINATIONS as R


def definition_hash(audience: ComputationConfig) -> str:
    """Fingerprint of what defines an audience's members (a trait group's values)."""
    parts = [audience.source, audience.definition_text, *audience.extra_traits]
    if audience.is_trait_group:  # never the same definition as an audience's
        parts.insert(0, "trait")
    material = "\x1f".join(parts)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def destinations_hash(audience: ComputationConfig) -> str:
    """Fingerprint of where an audience is sent (order does not matter)."""
    material = "\x1f".join(sorted(audience.destinations))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def ensure_audience(connection: Connection, audience: ComputationConfig) -> int:
    """The audience's (or trait group's) id, creating its row (and freezing its key) on first
    sync."""
    key = audience.trait_key
    columns = (A.c.id, A.c.retired_at, A.c.name, A.c.kind)
    row = connection.execute(select(*columns).where(A.c.key == key)).first()
    digest = definition_hash(audience)
    hashes = {"definition_hash": digest, "destinations_hash": destinations_hash(audience)}
    if row is None:
        # Two processes may create the same audience at once: the loser reads the winner's row.
        connection.execute(
            insert_ignoring_duplicates(connection, A).values(
                key=key, name=audience.name, kind=audience.kind, created_at=utcnow(), **hashes
            )
        )
        row = connection.execute(select(*columns).where(A.c.key == key)).one()
    if problem := _key_refusal(row, audience):
        raise AudienceSyncError(problem)
    if row.retired_at is not None:
        connection.execute(update(A).where(A.c.id == row.id).values(retired_at=None))
    connection.execute(update(A).where(A.c.id == row.id).values(name=audience.name, **hashes))
    return int(row.id)


def key_refusal(connection: Connection, audience: ComputationConfig) -> str | None:
    """Why the state DB refuses ``audience``'s key (held by the other kind of computation, or
    retired without ``allow_key_reuse``), or None; what ``ensure_audience`` raises."""
    columns = (A.c.id, A.c.retired_at, A.c.name, A.c.kind)
    row = connection.execute(select(*columns).where(A.c.key == audience.trait_key)).first()
    return None if row is None else _key_refusal(row, audience)


def _key_refusal(row: Row[Any], audience: ComputationConfig) -> str | None:
    key = audience.trait_key
    if row.kind != audience.kind:
        was = "an audience" if row.kind == "audience" else "a trait group"
        return (
            f'{audience.label} "{audience.name}": the key "{key}" belongs to {was} '
            f'("{row.name}") in the state database; choose another key'
        )
    if row.retired_at is not None and not audience.allow_key_reuse:
        return (
            f'audience "{audience.name}": the key "{key}" belonged to the retired audience '
            f'"{row.name}"; choose another key or set allow_key_reuse = true'
        )
    return None


def stored_audience(connection: Connection, config: Config, name: str) -> int:
    """The id of the audience ``name`` (a configured name or key, or a stored key), retired or
    not."""
    audience = config.find_audience(name)
    key = audience.trait_key if audience else name
    audience_id = connection.execute(select(A.c.id).where(A.c.key == key)).scalar()
    if audience_id is None:
        raise UnknownAudienceError(f'no audience "{name}" in the state database')
    return int(audience_id)


def live_audience_of(connection: Connection, audience: ComputationConfig) -> int | None:
    """The id of a configured audience that has synced and is not retired, else None."""
    audience_id = connection.execute(
        select(A.c.id).where(A.c.key == audience.trait_key, A.c.retired_at.is_(None))
    ).scalar()
    return None if audience_id is None else int(audience_id)


def store_exit_value(connection: Connection, audience_id: int, value: str | None) -> None:
    """Remember a trait group's leaver value (its traits all null) for `retire --send-null`
    (None: nothing recorded)."""
    connection.execute(update(A).where(A.c.id == audience_id).values(exit_value=value))


def exit_value_of(connection: Connection, audience_id: int) -> tuple[ComputationKind, str]:
    """The computation's kind, and what a member of it is sent when it ends: an audience's
    ``false``, a trait group's stored nulls (``'{}'`` if it never ran)."""
    kind, value = connection.execute(
        select(A.c.kind, A.c.exit_value).where(A.c.id == audience_id)
    ).one()
    if kind == "audience":
        return kind, FALSE_VALUE
    return kind, str(value or "{}")


def audience_title(connection: Connection, audience_id: int) -> str:
    """The name an audience was last synced under (for messages about it)."""
    return str(connection.execute(select(A.c.name).where(A.c.id == audience_id)).scalar_one())


def orphaned_audience(connection: Connection, config: Config, key: str) -> int:
    """The id of an audience that is in the state DB but no longer in the config."""
    configured = next((a for a in config.computations if a.trait_key == key), None)
    if configured is not None:
        raise AudienceSyncError(
            f'{configured.label} "{key}" is still in the config; remove it from the config '
            "before retiring it"
        )
    return live_audience(connection, key)


def live_audience(connection: Connection, key: str) -> int:
    """The id of the non-retired audience with ``key``."""
    row = connection.execute(select(A.c.id, A.c.retired_at, A.c.kind).where(A.c.key == key)).first()
    if row is None:
        raise UnknownAudienceError(f'no audience with the key "{key}" in the state database')
    if row.retired_at is not None:
        label = "trait group" if row.kind == "trait" else "audience"
        raise AudienceSyncError(f'{label} "{key}" is already retired')
    return int(row.id)


def audience_leaving_destination(
    connection: Connection, config: Config, name: str, destination: str
) -> tuple[int, str]:
    """(id, key) of the audience named ``name`` that has rows at ``destination`` but no longer
    lists it (configured or orphaned)."""
    configured = config.find_audience(name)
    key = configured.trait_key if configured else name
    if configured and destination in configured.destinations:
        raise AudienceSyncError(
            f'{configured.label} "{key}" still lists destination "{destination}" in its '
            "destinations; remove it from there first, then retire it"
        )
    audience_id = live_audience(connection, key)
    of = (M.c.audience_id == audience_id, M.c.destination == destination)
    if connection.execute(select(M.c.member_id).where(*of).limit(1)).first() is None:
        raise AudienceSyncError(
            f'audience "{key}" has nothing recorded for destination "{destination}"'
        )
    return audience_id, key


def forget_destination(
    engine: Engine,
    audience_id: int,
    destination: str,
    heir: str | None = None,
    *,
    held: list[str] | None = None,
) -> int:
    """Delete what the state DB knows of an audience at a destination it left; with ``heir``
    (the destination's new name: same place), first hand what it delivered there to the heir
    (``adopt_destination``). ``held``: the names its members still hold there (its key; a
    trait group's traits unless it delivered their nulls), which stay reserved at that
    destination (``retired_destinations``). Returns how many of the heir's rows that added or
    completed."""
    with engine.begin() as connection:
        handed = adopt_destination(connection, audience_id, destination, heir) if heir else 0
        # What an earlier retirement there recorded is still held by members the nulls of
        # this one did not reach (they were forgotten then): kept, at the heir if handed on.
        place = heir or destination
        recorded = and_(R.c.audience_id == audience_id, R.c.destination.in_({destination, place}))
        names = set(held or []) if heir is None else set()
        for earlier in connection.execute(select(R.c.names).where(recorded)).scalars():
            names |= set(json.loads(earlier))
        connection.execute(delete(R).where(recorded))
        for table in (M, P, E):
            connection.execute(
                delete(table).where(
                    table.c.audience_id == audience_id, table.c.destination == destination
                )
            )
        if names:
            connection.execute(
                insert(R).values(
                    audience_id=audience_id,
                    destination=place,
                    names=json.dumps(sorted(names)),
                    retired_at=utcnow(),
                )
            )
    return handed


def mark_retired(engine: Engine, audience_id: int) -> None:
    """Retire the audience; its key stays reserved."""
    with engine.begin() as connection:
        connection.execute(update(A).where(A.c.id == audience_id).values(retired_at=utcnow()))
