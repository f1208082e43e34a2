"""Segment-spec messages for audience membership changes, with deterministic message ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sync import __version__

MessageMode = Literal["identify", "track", "both"]
ENTERED_EVENT = "Audience Entered"
EXITED_EVENT = "Audience Exited"
LIBRARY = {"name": "audience-sync", "version": __version__}


@dataclass(frozen=True)
class MembershipChange:
    """One pending membership, as read for delivery."""

    id_kind: str
    member_id: str
    anonymous_id: str | None
    desired: bool
    version: int
    changed_at: datetime
    traits: dict[str, Any] | None
    in_doubt: bool = False


@dataclass(frozen=True)
class AudienceContext:
    """What every message of one audience and destination shares."""

    installation_id: str
    audience_id: int
    key: str
    destination: str
    mode: MessageMode = "identify"
    space_id: str = ""
    namespace: str = ""
    integrations: dict[str, Any] | None = None


def message_id(ctx: AudienceContext, change: MembershipChange, message_type: str) -> str:
    """Stable id for one change: a resend after a crash carries the same id (< 100 chars).

    Segment and RudderStack de-duplicate on it, so a crash between sending and recording the
    acknowledgement never turns into a second delivery.
    """
    material = "\x1f".join(
        [
            ctx.installation_id,
            ctx.key,
            ctx.destination,
            change.id_kind,
            change.member_id,
            str(change.version),
            message_type,
        ]
    )
    digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]
    return f"as-{digest}-v{change.version}"


def iso_timestamp(moment: datetime) -> str:
    """ISO-8601 in UTC with a Z suffix and milliseconds, as Segment's libraries write it."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _identity(change: MembershipChange) -> dict[str, str]:
    if change.id_kind == "user":
        ids = {"userId": change.member_id}
        if change.anonymous_id:
            ids["anonymousId"] = change.anonymous_id
        return ids
    return {"anonymousId": change.member_id}


def _context(ctx: AudienceContext) -> dict[str, Any]:
    personas: dict[str, Any] = {
        "computation_class": "audience",
        "computation_key": ctx.key,
        "computation_id": f"aud_{ctx.installation_id}_{ctx.audience_id}",
    }
    if ctx.space_id:
        personas["space_id"] = ctx.space_id
    if ctx.namespace:
        personas["namespace"] = ctx.namespace
    return {"personas": personas, "library": dict(LIBRARY)}


def build_messages(ctx: AudienceContext, change: MembershipChange) -> list[dict[str, Any]]:
    """The message(s) announcing one change: an identify, a track, or both (by mode)."""
    traits = dict(change.traits or {})
    messages: list[dict[str, Any]] = []
    common: dict[str, Any] = {
        **_identity(change),
        "timestamp": iso_timestamp(change.changed_at),
    }
    if ctx.integrations is not None:
        common["integrations"] = ctx.integrations
    if ctx.mode in ("identify", "both"):
        messages.append(
            {
                "type": "identify",
                **common,
                "traits": {**traits, ctx.key: change.desired},
                "messageId": message_id(ctx, change, "identify"),
                "context": _context(ctx),
            }
        )
    if ctx.mode in ("track", "both"):
        context = _context(ctx)
        if traits:
            context["traits"] = traits
        messages.append(
            {
                "type": "track",
                **common,
                "event": ENTERED_EVENT if change.desired else EXITED_EVENT,
                "properties": {"audience_key": ctx.key, ctx.key: change.desired},
                "messageId": message_id(ctx, change, "track"),
                "context": context,
            }
        )
    return messages


def encode(message: dict[str, Any]) -> str:
    """A message as compact JSON, encoded once and reused for sizing and sending."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
