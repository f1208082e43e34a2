"""Shared HTTP sending: one keep-alive client per destination, one pure classifier."""

from __future__ import annotations

import email.utils
import functools
import gzip
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx

from sync import __version__
from sync.errors import (
    CredentialsRejectedError,
    DeliveryError,
    PermanentDeliveryError,
    RejectedBatchError,
    TransientDeliveryError,
)
from sync.messages import iso_timestamp
from sync.redaction import redact

# Retry-After values above this are capped: a destination asking for an hour would stall the
# run; the leftovers simply stay pending for the next run instead.
MAX_RETRY_AFTER_SECONDS = 300.0
# Response text kept in errors and in memberships.last_error.
MAX_ERROR_TEXT = 300

Verdict = Literal["ok", "transient", "rejected", "credentials", "permanent"]


@dataclass(frozen=True)
class Outcome:
    """What an HTTP response means for the batch that caused it."""

    verdict: Verdict
    reason: str
    retry_after: float | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = now if now is not None else time.time()
        seconds = when.timestamp() - current
    return max(0.0, min(seconds, MAX_RETRY_AFTER_SECONDS))


def _snippet(body: str) -> str:
    # Redacted before it is cut: a secret echoed across the cut would leak its first half.
    text = redact(" ".join(body.split()))
    return text[:MAX_ERROR_TEXT] + ("…" if len(text) > MAX_ERROR_TEXT else "")


def classify_response(status: int, headers: httpx.Headers, body: str) -> Outcome:
    """Classify an HTTP response: success, retry later, bad batch, bad credentials, or stop."""
    detail = f"HTTP {status}" + (f": {_snippet(body)}" if body.strip() else "")
    if 200 <= status < 300:
        content_type = headers.get("content-type", "")
        if "html" in content_type or body.lstrip().lower().startswith(("<!doctype", "<html")):
            return Outcome(
                "transient",
                f"HTTP {status} with an HTML page instead of an API answer; is the endpoint "
                "URL right?",
            )
        return Outcome("ok", f"HTTP {status}")
    if status in (401, 403):
        return Outcome("credentials", detail)
    if status in (400, 413, 422):
        return Outcome("rejected", detail)
    if status in (408, 425, 429) or status >= 500:
        return Outcome("transient", detail, parse_retry_after(headers.get("retry-after")))
    return Outcome("permanent", detail)


def classify_transport_error(exc: httpx.TransportError) -> DeliveryError:
    """Network failures are transient, except TLS verification failures, which will not heal."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return PermanentDeliveryError(f"TLS failure: {cause}")
        cause = cause.__cause__ or cause.__context__
    kind = type(exc).__name__
    text = str(exc) or kind
    # Connecting failed: the request never left. Anything later may have reached the server.
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return TransientDeliveryError(f"{kind}: {text}", outcome_unknown=not never_sent)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (tens of milliseconds),
    and every run builds its destinations afresh. Honours SSL_CERT_FILE / SSL_CERT_DIR."""
    return httpx.create_ssl_context(trust_env=True)


class HttpSender:
    """POSTs JSON bodies to one URL over a keep-alive connection pool."""

    def __init__(
        self,
        destination: str,
        url: str,
        *,
        timeout: float,
        concurrency: int,
        use_gzip: bool = False,
        auth: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.destination = destination
        self.url = url
        self.use_gzip = use_gzip
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(
            timeout=timeout,
            limits=limits,
            auth=auth,
            verify=tls_context(),
            headers={"User-Agent": f"audience-sync/{__version__}", **(headers or {})},
        )

    def body_for(self, messages: list[str]) -> bytes:
        """The request body for a batch of encoded messages (Segment's batch envelope)."""
        sent_at = iso_timestamp(datetime.now(UTC))
        return f'{{"batch":[{",".join(messages)}],"sentAt":"{sent_at}"}}'.encode()

    def post(
        self,
        body: bytes,
        extra_headers: dict[str, str] | None = None,
        sign: Callable[[bytes], dict[str, str]] | None = None,
    ) -> None:
        """POST ``body``; raise the ``DeliveryError`` that classifies any failure. ``sign``
        gives headers computed over the bytes actually sent (after gzip)."""
        headers = {"Content-Type": "application/json", **(extra_headers or {})}
        if self.use_gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if sign is not None:
            headers.update(sign(body))
        try:
            response = self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise classify_transport_error(exc) from None
        outcome = classify_response(response.status_code, response.headers, response.text)
        where = f'destination "{self.destination}"'
        if outcome.verdict == "ok":
            return
        if outcome.verdict == "transient":
            raise TransientDeliveryError(
                f"{where}: {outcome.reason}",
                outcome.retry_after,
                # A 2xx that is not an API answer may come from a proxy that forwarded it.
                outcome_unknown=200 <= response.status_code < 300,
            )
        if outcome.verdict == "rejected":
            raise RejectedBatchError(outcome.reason)
        if outcome.verdict == "credentials":
            raise CredentialsRejectedError(
                f"{where} rejected the credentials ({outcome.reason}); check its write key "
                "or secret"
            )
        raise PermanentDeliveryError(f"{where}: {outcome.reason} from {self.url}")

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
