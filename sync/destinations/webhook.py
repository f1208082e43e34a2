"""Any HTTP endpoint: JSON batches, signed with HMAC-SHA256 over the exact bytes sent."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from sync.config import WebhookDestination as WebhookConfig
from sync.destinations.http import HttpSender


def signature(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookDestination:
    """POSTs ``{"batch": [...], "sentAt": ...}`` to a URL."""

    requires_user_id = False
    integrations: dict[str, Any] | None = None
    max_message_bytes: int | None = None

    def __init__(self, name: str, config: WebhookConfig) -> None:
        self.name = name
        self.max_batch_messages = config.batch_size
        self.max_batch_bytes: int | None = config.max_batch_bytes
        self.concurrency = config.concurrency
        self._secret = config.secret.get_secret_value() if config.secret else None
        self._header = config.signature_header
        self._sender = HttpSender(
            name,
            config.url,
            timeout=config.timeout,
            concurrency=config.concurrency,
            use_gzip=config.gzip,
            headers=config.headers,
        )

    def send(self, messages: list[str]) -> None:
        """POST one batch, signed over the exact bytes sent (the gzip stream when ``gzip``)."""
        self._sender.post(self._sender.body_for(messages), sign=self._sign)

    def _sign(self, sent: bytes) -> dict[str, str]:
        return {self._header: signature(self._secret, sent)} if self._secret else {}

    def close(self) -> None:
        """Close the connection pool."""
        self._sender.close()
