"""Segment-spec messages for audience membership changes and trait group value changes, with
deterministic message ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, Literal

from sync import __version__
from sync.clock import stored_utc

MessageMode = Literal["identify", "track", "both"]
ComputationClass = Literal["audience", "trait"]
ENTERED_EVENT = "Audience Entered"
EXITED_EVENT = "Audience Exited"
LIBRARY = {"name": "audience-sync", "version": __version__}


@dataclass(frozen=True)
class MembershipChange:
    """One pending membership, as read for delivery."""

    id_kind: str
    member_id: str
    anonymous_id: str | None
    # An audience's membership (True/False); a trait group's row values (a dict).
    value: Any
    version: int
    changed_at: datetime
    traits: dict[str, Any] | None


@dataclass(frozen=True)
class AudienceContext:
    """What every message of one computation (audience or trait group) and destination
    shares."""

    installation_id: str
    audience_id: int
    key: str
    destination: str
    mode: MessageMode = "identify"
    space_id: str = ""
    namespace: str = ""
    integrations: dict[str, Any] | None = None
    computation_class: ComputationClass = "audience"
    # Per audience and destination (README "Destinations"): copied into context.personas.
    external_audience_id: str = ""
    audience_settings: dict[str, Any] | None = None

    @property
    def is_trait(self) -> bool:
        """Whether this is a trait group's (identify only, traits = the row's values)."""
        return self.computation_class == "trait"


def _id_head(ctx: AudienceContext) -> Any:
    """The messageId hash fed with what every message of one audience and destination shares."""
    head = "\x1f".join([ctx.installation_id, ctx.key, ctx.destination, ""])
    return hashlib.sha256(head.encode("utf-8"))


def _finish_id(head: Any, id_kind: str, member_id: str, version: int, message_type: str) -> str:
    digest = head.copy()
    digest.update(f"{id_kind}\x1f{member_id}\x1f{version}\x1f{message_type}".encode())
    return f"as-{digest.hexdigest()[:40]}-v{version}"


def message_id(ctx: AudienceContext, change: MembershipChange, message_type: str) -> str:
    """Stable id for one change: a resend after a crash carries the same id (< 100 chars).

    Segment and RudderStack de-duplicate on it, so a crash between sending and recording the
    acknowledgement never turns into a second delivery.
    """
    return _finish_id(_id_head(ctx), change.id_kind, change.member_id, change.version, message_type)


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
    prefix = "trt" if ctx.is_trait else "aud"
    personas: dict[str, Any] = {
        "computation_class": ctx.computation_class,
        "computation_key": ctx.key,
        "computation_id": f"{prefix}_{ctx.installation_id}_{ctx.audience_id}",
    }
    if ctx.space_id:
        personas["space_id"] = ctx.space_id
    if ctx.namespace:
        personas["namespace"] = ctx.namespace
    if ctx.external_audience_id:
        personas["external_audience_id"] = ctx.external_audience_id
    if ctx.audience_settings is not None:
        personas["audience_settings"] = ctx.audience_settings
    return {"personas": personas, "library": dict(LIBRARY)}


def build_messages(ctx: AudienceContext, change: MembershipChange) -> list[dict[str, Any]]:
    """The message(s) announcing one change: an identify, a track, or both (by mode); a trait
    group's change is one identify whose traits are the row's values."""
    traits = dict(change.traits or {})
    messages: list[dict[str, Any]] = []
    common: dict[str, Any] = {
        **_identity(change),
        "timestamp": iso_timestamp(change.changed_at),
    }
    if ctx.integrations is not None:
        common["integrations"] = ctx.integrations
    if ctx.is_trait:
        return [
            {
                "type": "identify",
                **common,
                "traits": dict(change.value),
                "messageId": message_id(ctx, change, "identify"),
                "context": _context(ctx),
            }
        ]
    if ctx.mode in ("identify", "both"):
        messages.append(
            {
                "type": "identify",
                **common,
                "traits": {**traits, ctx.key: change.value},
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
                "event": ENTERED_EVENT if change.value else EXITED_EVENT,
                "properties": {"audience_key": ctx.key, ctx.key: change.value},
                "messageId": message_id(ctx, change, "track"),
                "context": context,
            }
        )
    return messages


def encode(message: dict[str, Any]) -> str:
    """A message as compact JSON, encoded once and reused for sizing and sending."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


class MessageEncoder:
    """Encodes one audience's messages for one destination, fast.

    What every message shares (the context, the integrations, the start of the messageId
    hash) is encoded once; each member's ids, stored value JSON text, timestamp and stored
    traits JSON text are spliced in. The result is the same JSON as
    ``encode(build_messages(...))`` (the tests parse and compare both); rows the splice
    cannot handle take that slower path.
    """

    def __init__(self, ctx: AudienceContext) -> None:
        self.ctx = ctx
        self._key = encode_basestring(ctx.key)
        self._quoted_key = f"{self._key}:"
        self._integrations = ""
        if ctx.integrations is not None:
            self._integrations = f',"integrations":{encode(ctx.integrations)}'
        self._context = encode(_context(ctx))
        self._id_head = _id_head(ctx)
        self._stamps: dict[Any, str] = {}

    def messages(
        self,
        id_kind: str,
        member_id: str,
        anonymous_id: str | None,
        value: str,
        version: int,
        changed_at: datetime | str,
        traits: str | None,
    ) -> list[str]:
        """The encoded message(s) for one change; ``value`` and ``traits`` are the stored JSON
        texts (an audience's ``true``/``false``; a trait group's row object)."""
        return self.encoded(id_kind, member_id, anonymous_id, value, version, changed_at, traits)[0]

    def encoded(
        self,
        id_kind: str,
        member_id: str,
        anonymous_id: str | None,
        value: str,
        version: int,
        changed_at: datetime | str,
        traits: str | None,
    ) -> tuple[list[str], list[str]]:
        """``messages``, and the messageId of each (the delivery ledger records them; finding
        them in the text again cost more)."""
        inner = None  # the traits object's members, without braces
        if self.ctx.is_trait:
            traits = None  # a trait group's values are its traits
        elif traits is not None:
            text = traits.strip()
            # The audience key among the traits (trait keys are ASCII) must be replaced, not
            # repeated; that and anything but an object take the slow path.
            if not (text.startswith("{") and text.endswith("}")) or self._key in text:
                change = MembershipChange(
                    id_kind,
                    member_id,
                    anonymous_id,
                    json.loads(value),
                    version,
                    stored_utc(changed_at),
                    json.loads(text),
                )
                built = build_messages(self.ctx, change)
                return [encode(m) for m in built], [str(m["messageId"]) for m in built]
            inner = text[1:-1].strip() or None
        if id_kind == "user":
            ids = '"userId":' + encode_basestring(member_id)
            if anonymous_id:
                ids += ',"anonymousId":' + encode_basestring(anonymous_id)
        else:
            ids = '"anonymousId":' + encode_basestring(member_id)
        common = f'{ids},"timestamp":"{self._stamp(changed_at)}"{self._integrations}'
        mode = self.ctx.mode
        finish = _finish_id
        if self.ctx.is_trait:
            mid = finish(self._id_head, id_kind, member_id, version, "identify")
            return [
                f'{{"type":"identify",{common},"traits":{value},'
                f'"messageId":"{mid}","context":{self._context}}}'
            ], [mid]
        out: list[str] = []
        mids: list[str] = []
        if mode in ("identify", "both"):
            first = "" if inner is None else f"{inner},"
            merged = f"{{{first}{self._quoted_key}{value}}}"
            mid = finish(self._id_head, id_kind, member_id, version, "identify")
            out.append(
                f'{{"type":"identify",{common},"traits":{merged},'
                f'"messageId":"{mid}","context":{self._context}}}'
            )
            mids.append(mid)
        if mode in ("track", "both"):
            event = ENTERED_EVENT if value == "true" else EXITED_EVENT
            context = self._context
            if inner is not None:
                context = f'{context[:-1]},"traits":{{{inner}}}}}'
            mid = finish(self._id_head, id_kind, member_id, version, "track")
            out.append(
                f'{{"type":"track",{common},"event":"{event}",'
                f'"properties":{{"audience_key":{self._key},{self._quoted_key}{value}}},'
                f'"messageId":"{mid}","context":{context}}}'
            )
            mids.append(mid)
        return out, mids

    def fitting(
        self,
        id_kind: str,
        member_id: str,
        anonymous_id: str | None,
        value: str,
        version: int,
        changed_at: datetime | str,
        traits: str | None,
        fits: Callable[[list[str]], bool],
    ) -> tuple[list[str], list[str]]:
        """The message(s) for one change that ``fits`` does not accept in full, with its
        largest traits left out one at a time until it does; and the names left out.

        The value change and the messageIds stay: a value change is never blocked by its
        traits. With every trait left out the result may still not fit; the caller checks.
        """
        values = json.loads(traits) if traits and not self.ctx.is_trait else None
        names = dict(values) if isinstance(values, dict) else {}
        # Largest first, so that as few traits as possible go missing.
        order = sorted(names, key=lambda name: (-len(encode({name: names[name]})), name))
        dropped: list[str] = []
        messages: list[str] = []
        for name in order:
            del names[name]
            dropped.append(name)
            kept = encode(names) if names else None
            messages = self.messages(
                id_kind, member_id, anonymous_id, value, version, changed_at, kept
            )
            if fits(messages):
                break
        if not order:  # no extra traits: what is too big is not theirs (a trait group's values)
            messages = self.messages(
                id_kind, member_id, anonymous_id, value, version, changed_at, None
            )
        return messages, dropped

    def _stamp(self, changed_at: datetime | str) -> str:
        """ISO timestamp of a stored value; one plan writes one ``changed_at`` for many rows."""
        stamp = self._stamps.get(changed_at)
        if stamp is None:
            stamp = iso_timestamp(stored_utc(changed_at))
            if len(self._stamps) > 10_000:
                self._stamps.clear()
            self._stamps[changed_at] = stamp
        return stamp
