"""Segment's HTTP Tracking API ``/v1/batch`` (also RudderStack and other compatible collectors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import SecretStr, field_validator

from sync.destinations.http import HttpSender, HttpSettings, api_url, check_http_url

# Segment HTTP Tracking API limit (segment.com/docs/connections/sources/catalog/libraries/
# server/http-api/#max-request-size): 32 KB per message. The per-batch limits are in http.py.
SEGMENT_MAX_MESSAGE_BYTES = 32 * 1024
SEGMENT_ENDPOINT = "https://api.segment.io"


class SegmentApiSettings(HttpSettings):
    """Settings of every destination reached through Segment's HTTP API."""

    write_key: SecretStr
    endpoint: str = SEGMENT_ENDPOINT

    _endpoint = field_validator("endpoint")(check_http_url)

    def routing(self) -> dict[str, Any] | None:
        """The ``integrations`` object every message carries (Segment's routing), if any."""
        raise NotImplementedError


class SegmentSettings(SegmentApiSettings):
    """Segment's HTTP Tracking API, or any collector that speaks it (RudderStack, ...)."""

    type: Literal["segment"]
    integrations: dict[str, Any] | None = None

    def routing(self) -> dict[str, Any] | None:
        """The configured ``integrations``, if any."""
        return self.integrations


class SegmentDestination:
    """Batches to ``{endpoint}/v1/batch`` with HTTP Basic auth (write key as user name)."""

    requires_user_id = False

    def __init__(self, name: str, settings: SegmentApiSettings) -> None:
        self.name = name
        self.max_batch_messages = settings.batch_size
        self.max_batch_bytes: int | None = settings.max_batch_bytes
        self.concurrency = settings.concurrency
        self.max_message_bytes: int | None = SEGMENT_MAX_MESSAGE_BYTES
        self.integrations: dict[str, Any] | None = settings.routing()
        self._sender = HttpSender(
            name,
            api_url(settings.endpoint, "/v1/batch"),
            timeout=settings.timeout,
            concurrency=settings.concurrency,
            use_gzip=settings.gzip,
            auth=(settings.write_key.get_secret_value(), ""),
        )

    def send(self, messages: list[str]) -> None:
        """POST one batch."""
        self._sender.post(self._sender.body_for(messages))

    def close(self) -> None:
        """Close the connection pool."""
        self._sender.close()
