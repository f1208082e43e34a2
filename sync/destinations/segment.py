"""Segment's HTTP Tracking API ``/v1/batch`` (also RudderStack and other compatible collectors)."""

from __future__ import annotations

from typing import Any

from sync.config import SEGMENT_MAX_MESSAGE_BYTES
from sync.config import SegmentDestination as SegmentConfig
from sync.config import WishpondDestination as WishpondConfig
from sync.destinations.http import HttpSender

# Wishpond is reached through Segment by routing each message to it alone.
WISHPOND_INTEGRATIONS = {"All": False, "Wishpond": True}


class SegmentDestination:
    """Batches to ``{endpoint}/v1/batch`` with HTTP Basic auth (write key as user name)."""

    requires_user_id = False

    def __init__(self, name: str, config: SegmentConfig | WishpondConfig) -> None:
        self.name = name
        self.max_batch_messages = config.batch_size
        self.max_batch_bytes: int | None = config.max_batch_bytes
        self.concurrency = config.concurrency
        self.max_message_bytes: int | None = SEGMENT_MAX_MESSAGE_BYTES
        self.integrations: dict[str, Any] | None = (
            config.integrations if isinstance(config, SegmentConfig) else None
        )
        self._sender = HttpSender(
            name,
            config.endpoint.rstrip("/") + "/v1/batch",
            timeout=config.timeout,
            concurrency=config.concurrency,
            use_gzip=config.gzip,
            auth=(config.write_key.get_secret_value(), ""),
        )

    def send(self, messages: list[str]) -> None:
        """POST one batch."""
        self._sender.post(self._sender.body_for(messages))

    def close(self) -> None:
        """Close the connection pool."""
        self._sender.close()


class WishpondDestination(SegmentDestination):
    """Segment, routed only to Wishpond; Wishpond needs a userId, so anonymous members skip.

    Segment's catalog lists Wishpond as a browser (device-mode) destination: messages sent
    from a server and routed to it are not delivered by Segment. See the README.
    """

    requires_user_id = True

    def __init__(self, name: str, config: WishpondConfig) -> None:
        super().__init__(name, config)
        self.integrations = dict(WISHPOND_INTEGRATIONS)
