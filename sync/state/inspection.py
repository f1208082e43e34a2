"""Read-only views of the state database for `status`, `runs`, `members` and `user`."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, and_, case, func, or_, select, true

from sync.config import ComputationConfig, Config
from sync.errors import UnknownAudienceError
from sync.state.daemons import scheduled_runs
from sync.state.memberships import is_pending
from sync.state.runs import run_reason
from sync.state.tables import AUDIENCES as A
from sync.state.tables import DELIVERIES as V
from sync.state.tables import DELIVERY_BATCHES as L
from sync.state.tables import MEMBERSHIPS as M
from sync.state.tables import RUN_DELIVERIES as D
from sync.state.tables import RUNS as R

MemberFilter = Literal["all", "pending", "failed", "exited"]
# A member id that every JSON encoder writes as itself between quotes (no escapes).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.@:+-]+")


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat(timespec="seconds") if moment else None


def audience_by_name(connection: Connection, config: Config, name: str) -> Any:
    """The state-DB row of the audience named ``name`` (config name or key, or a stored key)."""
    configured = config.find_audience(name)
    key = configured.trait_key if configured else name
    row = connection.execute(select(A).where(A.c.key == key)).first()
    if row is None:
        row = connection.execute(select(A).where(A.c.name == name)).first()
    if row is None:
        known = connection.execute(select(A.c.key).order_by(A.c.key)).scalars().all()
        raise UnknownAudienceError(
            f'no audience "{name}" in the state database (known: {", ".join(known) or "none"})'
        )
    return row


def status_rows(connection: Connection, config: Config) -> list[dict[str, Any]]:
    """One row per audience and destination, plus configured audiences never synced."""
    counts = connection.execute(
        select(
            M.c.audience_id,
            M.c.destination,
            func.sum(case((M.c.desired, 1), else_=0)).label("members"),
            func.sum(case((is_pending(), 1), else_=0)).label("pending"),
            func.sum(case((M.c.status == "failed", 1), else_=0)).label("failed"),
        ).group_by(M.c.audience_id, M.c.destination)
    ).all()
    by_audience: dict[int, list[Any]] = {}
    for row in counts:
        by_audience.setdefault(row.audience_id, []).append(row)
    configured = {a.trait_key: a for a in config.computations}
    next_runs = scheduled_runs(connection)  # written by live daemons; none when none runs
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for audience in connection.execute(select(A).order_by(A.c.key)).all():
        seen.add(audience.key)
        last = connection.execute(
            select(R).where(R.c.audience_id == audience.id).order_by(R.c.id.desc()).limit(1)
        ).first()
        state = _audience_state(audience, configured.get(audience.key))
        destinations = by_audience.get(audience.id) or [None]
        for entry in destinations:
            rows.append(
                {
                    "key": audience.key,
                    "name": audience.name,
                    "kind": audience.kind,
                    "state": _row_state(state, configured.get(audience.key), entry),
                    "destination": entry.destination if entry else None,
                    "members": int(entry.members or 0) if entry else 0,
                    "pending": int(entry.pending or 0) if entry else 0,
                    "failed": int(entry.failed or 0) if entry else 0,
                    "last_run": _run_summary(last),
                    "lease_owner": audience.lease_owner,
                    "next_run": _iso(next_runs.get(audience.key)) if state == "active" else None,
                }
            )
    for key, audience_config in configured.items():
        if key not in seen:
            rows.append(
                {
                    "key": key,
                    "name": audience_config.name,
                    "kind": audience_config.kind,
                    "state": "never synced" if audience_config.enabled else "disabled",
                    "destination": None,
                    "members": 0,
                    "pending": 0,
                    "failed": 0,
                    "last_run": None,
                    "lease_owner": None,
                    "next_run": _iso(next_runs.get(key)),
                }
            )
    return rows


def _audience_state(audience: Any, configured: ComputationConfig | None) -> str:
    """retired, orphaned (no longer in the config), disabled or active."""
    if audience.retired_at is not None:
        return "retired"
    if configured is None:
        return "orphaned"
    return "active" if configured.enabled else "disabled"


def _row_state(state: str, configured: ComputationConfig | None, entry: Any) -> str:
    """A configured audience's rows at a destination it no longer lists are `dropped`
    (`retire AUDIENCE --destination NAME` ends them)."""
    if state != "active" or configured is None or entry is None:
        return state
    if entry.destination not in configured.destinations:
        return "dropped"
    return state


def _run_summary(run: Any) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "id": run.id,
        "status": run.status,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "added": run.added,
        "removed": run.removed,
        "sent": run.sent,
        "rejected": run.rejected,
    }


def run_rows(
    connection: Connection, config: Config, audience: str | None, limit: int
) -> list[dict[str, Any]]:
    """Run history, newest first, with per-destination results."""
    query = select(R, A.c.key).join(A, A.c.id == R.c.audience_id).order_by(R.c.id.desc())
    if audience is not None:
        query = query.where(R.c.audience_id == audience_by_name(connection, config, audience).id)
    runs = connection.execute(query.limit(limit)).all()
    details: dict[int, list[dict[str, Any]]] = {}
    if runs:
        for d in connection.execute(select(D).where(D.c.run_id.in_([r.id for r in runs]))).all():
            details.setdefault(d.run_id, []).append(
                {k: getattr(d, k) for k in d._fields if k != "run_id"}
            )
    rows = []
    for run in runs:
        seconds = (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
        rows.append(
            {
                "id": run.id,
                "audience": run.key,
                "trigger": run.trigger,
                "status": run.status,
                "owner": run.owner,
                "started_at": _iso(run.started_at),
                "finished_at": _iso(run.finished_at),
                "seconds": round(seconds, 3) if seconds is not None else None,
                "members": run.members,
                "added": run.added,
                "removed": run.removed,
                "sent": run.sent,
                "rejected": run.rejected,
                "failed": sum(d["failed"] for d in details.get(run.id, [])),
                "invalid": run.invalid,
                "duplicates": run.duplicates,
                "skipped": run.skipped,
                "compute_seconds": run.compute_seconds,
                "plan_seconds": run.plan_seconds,
                "deliver_seconds": run.deliver_seconds,
                "error": run.error,
                "why": run_reason(run.error, details.get(run.id, [])),
                "invalid_samples": run.invalid_samples or [],
                "destinations": details.get(run.id, []),
            }
        )
    return rows


def _json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _membership(row: Any, key: str | None = None) -> dict[str, Any]:
    data = {
        "_audience_id": row.audience_id,
        "_delivered_at": row.delivered_at,
        "destination": row.destination,
        "id_kind": row.id_kind,
        "member_id": row.member_id,
        "anonymous_id": row.anonymous_id,
        "desired": bool(row.desired),
        # The value it should have, and the one the destination last acknowledged (None:
        # none yet): an audience's true/false, a trait group's values.
        "value": _json_value(row.value),
        "synced": _json_value(row.synced_value),
        "version": row.version,
        "changed_at": _iso(row.changed_at),
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": _iso(row.next_attempt_at),
        "delivered_at": _iso(row.delivered_at),
        "last_error": row.last_error,
        "traits": row.traits,
        # The delivery ledger's last message to this member here; where the ledger holds
        # nothing as new as the last acknowledgement (it was off, or pruned), that
        # acknowledgement (None: nothing was ever acknowledged or logged).
        "last_sent": None,
        "last_sent_at": None,
        "last_outcome": None,
    }
    if key is not None:
        data = {"audience": key, **data}
    return data


def member_rows(
    connection: Connection,
    config: Config,
    audience: str,
    *,
    destination: str | None,
    which: MemberFilter,
    limit: int,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Memberships of one audience, in member order: ``limit`` rows after the first
    ``offset``."""
    row = audience_by_name(connection, config, audience)
    query = select(M).where(*_member_filter(row.id, destination, which))
    query = query.order_by(M.c.destination, M.c.id_kind, M.c.member_id)
    query = query.limit(limit).offset(offset)
    rows = [_membership(r) for r in connection.execute(query).all()]
    members = {r["member_id"] for r in rows}
    _add_last_sent(connection, rows, V.c.audience_id == row.id, members)
    return rows


def _add_last_sent(
    connection: Connection, rows: list[dict[str, Any]], where: Any, members: set[str]
) -> None:
    """Fill each membership row's ``last_sent`` (the value), ``last_sent_at`` and
    ``last_outcome`` from the delivery ledger's newest row for it — or from the row's own last
    acknowledgement (``synced``, ``delivered_at``) where the ledger has nothing that recent:
    messages sent while ``[state] delivery_ledger`` was off, or pruned."""
    if not rows:
        return
    last: dict[tuple[int, str, str, str], Any] = {}
    # Through the view (one row per message, its member id exact on every state DB). A ledger
    # row's messages are one JSON array, with no index inside it, so: only what is at least as
    # recent as every row's last acknowledgement (older tells no more than the row itself),
    # and for a few members with plain ids, only the rows whose text names them (a pattern per
    # member costs a pass over the text each; plain ids read the same in any JSON encoder's
    # output, 0018's copies included).
    delivered = [data["_delivered_at"] for data in rows]
    if all(moment is not None for moment in delivered):
        since = min(delivered)
        where = and_(where, or_(V.c.sent_at >= since, V.c.acknowledged_at >= since))
    if len(members) <= 3 and all(_PLAIN_ID.fullmatch(member) for member in members):
        named = or_(*(L.c.messages.contains(f'"{member}"') for member in members))
        where = and_(where, V.c.id.in_(select(L.c.id).where(named)))
    ordered = sorted(members)
    for start in range(0, len(ordered), 500):  # bounded IN lists
        query = (
            select(V.c.audience_id, V.c.destination, V.c.id_kind, V.c.member_id, V.c.value)
            .add_columns(V.c.sent_at, V.c.acknowledged_at, V.c.outcome)
            .where(where, V.c.member_id.in_(ordered[start : start + 500]))
            .order_by(V.c.id, V.c.position)
        )
        for entry in connection.execute(query):  # oldest first: the newest stays
            key = (entry.audience_id, entry.destination, entry.id_kind, entry.member_id)
            value = _json_value(entry.value)
            last[key] = (value, entry.sent_at, entry.acknowledged_at, entry.outcome)
    for data in rows:
        found = last.get(
            (data.pop("_audience_id"), data["destination"], data["id_kind"], data["member_id"])
        )
        acknowledged = data.pop("_delivered_at")
        if acknowledged is not None and (found is None or (found[2] or found[1]) < acknowledged):
            data["last_sent"] = data["synced"]
            data["last_sent_at"] = _iso(acknowledged)
            data["last_outcome"] = "acknowledged"
        elif found is not None:
            data["last_sent"], data["last_sent_at"], data["last_outcome"] = (
                found[0],
                _iso(found[1]),
                found[3],
            )


def count_member_rows(
    connection: Connection,
    config: Config,
    audience: str,
    *,
    destination: str | None,
    which: MemberFilter,
) -> int:
    """How many rows ``member_rows`` pages through."""
    row = audience_by_name(connection, config, audience)
    query = select(func.count()).select_from(M).where(*_member_filter(row.id, destination, which))
    return int(connection.execute(query).scalar_one())


def _member_filter(
    audience_id: int, destination: str | None, which: MemberFilter
) -> list[ColumnElement[bool]]:
    conditions = [M.c.audience_id == audience_id]
    if destination is not None:
        conditions.append(M.c.destination == destination)
    if which == "pending":
        conditions.append(is_pending())
    elif which == "failed":
        conditions.append(M.c.status == "failed")
    elif which == "exited":
        conditions.append(and_(M.c.desired.is_(False)))
    else:
        conditions.append(M.c.desired.is_(True))
    return conditions


def user_rows(connection: Connection, member_id: str) -> list[dict[str, Any]]:
    """Every audience and destination one member (user or anonymous id) appears in."""
    query = (
        select(M, A.c.key)
        .join(A, A.c.id == M.c.audience_id)
        .where(M.c.member_id == member_id)
        .order_by(A.c.key, M.c.destination)
    )
    rows = [_membership(r, r.key) for r in connection.execute(query).all()]
    _add_last_sent(connection, rows, true(), {member_id})
    return rows
