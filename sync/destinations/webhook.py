"""Any HTTP endpoint: JSON batches, signed with HMAC-SHA256 over the exact bytes sent."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from sync.destinations.http import HttpSender, HttpSettings, check_http_url

# The header carrying the signature unless `signature_header` names another.
SIGNATURE_HEADER = "X-Audience-Sync-Signature"


class WebhookSettings(HttpSettings):
    """POST JSON batches to any URL, signed with HMAC-SHA256 when a secret is set."""

    type: Literal["webhook"]
    url: str
    secret: SecretStr | None = None
    signature_header: str = SIGNATURE_HEADER
    headers: dict[str, str] = Field(default_factory=dict)

    _url = field_validator("url")(check_http_url)


def signature(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookDestination:
    """POSTs ``{"batch": [...], "sentAt": ...}`` to a URL."""

    requires_user_id = False
    integrations: dict[str, Any] | None = None
    max_message_bytes: int | None = None

    def __init__(self, name: str, settings: WebhookSettings) -> None:
        self.name = name
        self.max_batch_messages = settings.batch_size
        self.max_batch_bytes: int | None = settings.max_batch_bytes
        self.concurrency = settings.concurrency
        self._secret = settings.secret.get_secret_value() if settings.secret else None
        self._header = settings.signature_header
        self._sender = HttpSender(
            name,
            settings.url,
            timeout=settings.timeout,
            concurrency=settings.concurrency,
            use_gzip=settings.gzip,
            headers=settings.headers,
        )

    def send(self, messages: list[str]) -> None:
        """POST one batch, signed over the exact bytes sent (the gzip stream when ``gzip``)."""
        self._sender.post(self._sender.body_for(messages), sign=self._sign)

    def _sign(self, sent: bytes) -> dict[str, str]:
        return {self._header: signature(self._secret, sent)} if self._secret else {}

    def close(self) -> None:
        """Close the connection pool."""
        self._sender.close()
