"""The one protocol every destination implements."""

from __future__ import annotations

from typing import Any, Protocol


class Destination(Protocol):
    """Where messages go. ``send`` delivers one batch or raises a ``DeliveryError``.

    ``send`` must be safe to call from several threads at once (delivery runs up to
    ``concurrency`` batches in flight).
    """

    name: str
    max_batch_messages: int
    max_batch_bytes: int | None
    max_message_bytes: int | None
    concurrency: int
    requires_user_id: bool
    integrations: dict[str, Any] | None

    def send(self, messages: list[str]) -> None:
        """Deliver one batch of messages, each already encoded as compact JSON; return only
        when the destination acknowledged all of it."""

    def close(self) -> None:
        """Release connections and files."""
