"""Batches: pending rows encoded into messages and packed into batches within a destination's
limits; a message over the per-message limit loses the traits that make it too big."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sync.destinations import Destination
from sync.messages import MessageEncoder, encode

logger = logging.getLogger("sync.delivery")

# Bytes of the batch envelope around the messages ({"batch":[...],"sentAt":"..."}), rounded up.
BATCH_ENVELOPE_BYTES = 128


class Unit(NamedTuple):
    """One membership change and the message(s) that announce it (a tuple: built per row)."""

    id_kind: str
    member_id: str
    version: int
    in_doubt: bool
    messages: list[str]  # encoded JSON
    size: int
    # The stored value and the extra traits the messages carry (the delivery ledger's): those
    # stored, less what a message over its size limit was sent without.
    value: str | None = None
    traits: str | None = None
    # Each message's messageId, from the encoder (the ledger records them).
    ids: Sequence[str] = ()


@dataclass
class BatchResult:
    """What became of a batch's units: the ledger records it in one transaction."""

    delivered: list[Unit] = field(default_factory=list)
    # Each with the destination's reason; they count an attempt.
    rejected: list[tuple[Unit, str]] = field(default_factory=list)
    # Not delivered for a transient reason (or a fatal one): pending, retried after the delay.
    left: list[Unit] = field(default_factory=list)
    left_reason: str | None = None
    retry_delay: float = 0.0
    # The units (id kind, member id) an attempt of which ended without knowing whether the
    # destination applied it: per unit, since the halves of a split batch fare differently.
    uncertain: set[tuple[str, str]] = field(default_factory=set)
    # The error that ends this destination's delivery (bad credentials, unwritable file).
    fatal: str | None = None
    # When its page was handed over: [time, the driver's form of it] (``Ledger.handed``).
    handed: list[Any] | None = None

    # A split batch's left units whose half ended for another reason or delay than
    # ``left_reason``/``retry_delay``: (id kind, member id) -> (reason, delay).
    left_why: dict[tuple[str, str], tuple[str | None, float]] = field(default_factory=dict)

    def why(self, unit: Unit) -> tuple[str | None, float]:
        """Why ``unit`` was left, and when it may be retried (seconds from now)."""
        return self.left_why.get(
            (unit.id_kind, unit.member_id), (self.left_reason, self.retry_delay)
        )

    def doubtful(self, unit: Unit) -> bool:
        """Whether the destination may have applied ``unit`` in an attempt of this batch."""
        return (unit.id_kind, unit.member_id) in self.uncertain


def unit_keys(units: list[Unit]) -> set[tuple[str, str]]:
    """``BatchResult.uncertain``'s keys of ``units``."""
    return {(unit.id_kind, unit.member_id) for unit in units}


def message_size(message: str) -> int:
    """UTF-8 bytes of one encoded message (what a per-message limit is about)."""
    return len(message) if message.isascii() else len(message.encode("utf-8"))


# Each message in a batch body is followed by a separating comma (counted against the batch).
SEPARATOR_BYTES = 1


class Batcher:
    """Encodes one destination's pending rows and packs them into batches."""

    def __init__(
        self,
        encoder: MessageEncoder,
        destination: Destination,
        *,
        on_trimmed: Callable[[], None],
        on_oversized: Callable[[list[tuple[Unit, str]]], None],
    ) -> None:
        """``on_trimmed`` counts a message sent without some traits; ``on_oversized`` records
        the rows of a page whose message is too big even without its traits (rejected)."""
        self.encoder = encoder
        self.name = encoder.ctx.destination
        self.max_batch_messages = destination.max_batch_messages
        self.max_batch_bytes = destination.max_batch_bytes
        self.max_message_bytes = destination.max_message_bytes
        self.on_trimmed = on_trimmed
        self.on_oversized = on_oversized

    def batches(self, rows: list[Any]) -> Iterator[list[Unit]]:
        """The batches of one page of rows (``Ledger.pages``' tuples), in row order."""
        limit_messages = self.max_batch_messages
        limit_bytes = self.max_batch_bytes
        batch: list[Unit] = []
        batch_messages = 0
        batch_bytes = BATCH_ENVELOPE_BYTES
        oversized: list[tuple[Unit, str]] = []
        encode = self.encoder.encoded
        for kind, member, anonymous, value, in_doubt, version, changed_at, traits in rows:
            messages, ids = encode(kind, member, anonymous, value, version, changed_at, traits)
            # Bytes in the body (UTF-8) plus the separating commas; one message in the common
            # (identify) case, so no list is built for it.
            if len(messages) == 1:
                largest = message_size(messages[0])
                size = largest + SEPARATOR_BYTES
            else:
                sizes = [message_size(m) for m in messages]
                size, largest = sum(sizes) + SEPARATOR_BYTES * len(sizes), max(sizes)
            if self.max_message_bytes is not None and largest > self.max_message_bytes:
                # The value change must go through: without the traits that make it too big
                # (its messageIds do not depend on them).
                messages, dropped = self.encoder.fitting(
                    kind, member, anonymous, value, version, changed_at, traits, self.fits
                )
                sizes = [message_size(m) for m in messages]
                size = sum(sizes) + SEPARATOR_BYTES * len(sizes)
                traits = self._sent_traits(traits, dropped)  # what the ledger records
                if not self.fits(messages):
                    unit = Unit(
                        kind, member, version, bool(in_doubt), messages, size, value, traits, ids
                    )
                    oversized.append((unit, self._too_big(max(sizes))))
                    continue
                self._trimmed(member, largest, dropped)
            unit = Unit(kind, member, version, bool(in_doubt), messages, size, value, traits, ids)
            too_many = batch_messages + len(messages) > limit_messages
            too_big = limit_bytes is not None and batch_bytes + unit.size > limit_bytes
            if batch and (too_many or too_big):
                yield batch
                batch, batch_messages, batch_bytes = [], 0, BATCH_ENVELOPE_BYTES
            batch.append(unit)
            batch_messages += len(messages)
            batch_bytes += unit.size
        if oversized:
            self.on_oversized(oversized)
        if batch:
            yield batch

    def _sent_traits(self, traits: str | None, dropped: list[str]) -> str | None:
        """A trimmed message's extra traits as sent: the stored ones without ``dropped``."""
        if not dropped or traits is None or self.encoder.ctx.is_trait:
            return traits
        values = json.loads(traits)
        kept = {name: value for name, value in values.items() if name not in dropped}
        return encode(kept) if kept else None

    def fits(self, messages: list[str]) -> bool:
        """Whether every message is within the destination's per-message limit."""
        limit = self.max_message_bytes
        return limit is None or all(message_size(m) <= limit for m in messages)

    def _too_big(self, size: int) -> str:
        return (
            f"message is {size} bytes even without its traits, over the destination's limit "
            f"of {self.max_message_bytes} bytes"
        )

    def _trimmed(self, member: str, size: int, dropped: list[str]) -> None:
        """Count and name a message sent without the traits that made it too big."""
        logger.warning(
            'destination "%s": member %s: message of %d bytes is over the limit of %d bytes; '
            "sent without trait(s) %s",
            self.name,
            member,
            size,
            self.max_message_bytes,
            ", ".join(dropped),
        )
        self.on_trimmed()
