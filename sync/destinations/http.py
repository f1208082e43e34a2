"""Shared HTTP sending: the settings every HTTP destination accepts, one keep-alive client per
destination, one pure classifier."""

from __future__ import annotations

import email.utils
import functools
import gzip
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import Field

from sync import __version__
from sync.destinations.base import BaseDestinationSettings
from sync.errors import (
    CredentialsRejectedError,
    DeliveryError,
    PermanentDeliveryError,
    RejectedBatchError,
    TransientDeliveryError,
)
from sync.messages import iso_timestamp
from sync.redaction import redact

# Segment HTTP Tracking API limits (segment.com/docs/connections/sources/catalog/libraries/
# server/http-api/#max-request-size): 500 KB per batch request and at most 2,500 messages per
# batch. Every HTTP destination keeps within them: webhook receivers are often Segment-compatible.
# The default batch is 500,000 bytes (500 KB as documented); 512,000 is the most a setting may
# ask for (500 KiB, what Segment's gateway was seen to take).
SEGMENT_MAX_BATCH_MESSAGES = 2500
SEGMENT_BATCH_BYTES = 500_000
SEGMENT_MAX_BATCH_BYTES = 500 * 1024
# Sanity bounds of our own on the settings (no destination states them): `max_batch_bytes`
# must exceed 1 KiB; each request in flight holds a pooled connection and a thread.
MIN_BATCH_BYTES_LIMIT = 1024
MAX_CONCURRENCY = 64

# Retry-After values above this are capped: a destination asking for an hour would stall the
# run; the leftovers simply stay pending for the next run instead.
MAX_RETRY_AFTER_SECONDS = 300.0
# Response text kept in errors and in memberships.last_error.
MAX_ERROR_TEXT = 300

Verdict = Literal["ok", "transient", "rejected", "credentials", "permanent"]


class HttpSettings(BaseDestinationSettings):
    """Settings every destination that POSTs batches over HTTP accepts."""

    batch_size: int = Field(default=500, gt=0, le=SEGMENT_MAX_BATCH_MESSAGES)
    max_batch_bytes: int = Field(
        default=SEGMENT_BATCH_BYTES, gt=MIN_BATCH_BYTES_LIMIT, le=SEGMENT_MAX_BATCH_BYTES
    )
    timeout: float = Field(default=15.0, gt=0)
    concurrency: int = Field(default=4, gt=0, le=MAX_CONCURRENCY)
    gzip: bool = False


def check_http_url(value: str) -> str:
    """An http(s) URL with a host and a numeric port, if any: anything else would only fail
    at send time (an ftp:// URL was retried as a transient error for the whole budget)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL with a host")
    del port
    return value


def api_url(base: str, path: str) -> str:
    """``path`` (``/v1/batch``) appended to the path of ``base``, whose query string (a
    proxy's, say) stays the query: pasted after it, the path would be sent as part of the
    query. A ``base`` that already ends with ``path`` (the batch URL pasted whole) is kept."""
    parts = urlsplit(base.strip())
    stem = parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=stem.removesuffix(path) + path, fragment=""))


@dataclass(frozen=True)
class Outcome:
    """What an HTTP response means for the batch that caused it."""

    verdict: Verdict
    reason: str
    retry_after: float | None = None
    # The destination may have applied the batch although the answer is a failure.
    outcome_unknown: bool = False


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


def _location(value: str) -> str:
    """A redirect's target as one line, without the user name and password it may carry."""
    text = " ".join(value.split())[:MAX_ERROR_TEXT]
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return "an unparsable Location"
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    return parts.geturl()


def _redirect(status: int, headers: httpx.Headers) -> Outcome:
    """Redirects are not followed (a POST may turn into a GET, credentials may travel to
    another host): the configured URL is wrong, and the answer says what to put instead."""
    location = headers.get("location")
    if location:
        text = f"redirect to {_location(location)} (not followed: put that URL in the config)"
    else:
        text = "redirect without a Location (not followed: check the URL in the config)"
    return Outcome("permanent", f"HTTP {status} {text}")


def classify_response(status: int, headers: httpx.Headers, body: str) -> Outcome:
    """Classify an HTTP response: success, retry later, bad batch, bad credentials, or stop."""
    detail = f"HTTP {status}" + (f": {_snippet(body)}" if body.strip() else "")
    if 200 <= status < 300:
        content_type = headers.get("content-type", "")
        if "html" in content_type or body.lstrip().lower().startswith(("<!doctype", "<html")):
            # A proxy's page: it may have forwarded the batch before answering.
            return Outcome(
                "transient",
                f"HTTP {status} with an HTML page instead of an API answer; is the endpoint "
                "URL right?",
                outcome_unknown=True,
            )
        return Outcome("ok", f"HTTP {status}")
    if 300 <= status < 400:
        return _redirect(status, headers)
    if status in (401, 403):
        return Outcome("credentials", detail)
    if status in (400, 413, 422):
        return Outcome("rejected", detail)
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status >= 500:
        # A gateway's 502/503/504 (or any 5xx) says nothing about whether the service behind
        # it applied the batch before failing or timing out.
        return Outcome("transient", detail, retry_after, outcome_unknown=True)
    if status in (408, 425, 429):
        # Refused before processing: the batch was not applied.
        return Outcome("transient", detail, retry_after)
    return Outcome("permanent", detail)


def classify_transport_error(exc: httpx.TransportError, where: str = "") -> DeliveryError:
    """Network failures are transient, except TLS verification failures, which will not heal.
    ``where`` (``destination "NAME"``) starts the message: every warning names its destination."""
    prefix = f"{where}: " if where else ""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return PermanentDeliveryError(f"{prefix}TLS failure: {cause}")
        cause = cause.__cause__ or cause.__context__
    kind = type(exc).__name__
    text = str(exc) or kind
    # Connecting failed: the request never left. Anything later may have reached the server.
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    # A full pool of our own is no sign of a dead destination; a refused connection is.
    unreachable = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    return TransientDeliveryError(
        f"{prefix}{kind}: {text}", outcome_unknown=not never_sent, connection_failed=unreachable
    )


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
        where = f'destination "{self.destination}"'
        try:
            response = self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise classify_transport_error(exc, where) from None
        outcome = classify_response(response.status_code, response.headers, response.text)
        if outcome.verdict == "ok":
            return
        if outcome.verdict == "transient":
            raise TransientDeliveryError(
                f"{where}: {outcome.reason}",
                outcome.retry_after,
                outcome_unknown=outcome.outcome_unknown,
            )
        if outcome.verdict == "rejected":
            raise RejectedBatchError(outcome.reason)
        if outcome.verdict == "credentials":
            raise CredentialsRejectedError(
                f"{where} rejected the credentials ({outcome.reason}); check its write key "
                "or secret"
            )
        if 300 <= response.status_code < 400:
            raise PermanentDeliveryError(f"{where}: {outcome.reason}")
        raise PermanentDeliveryError(f"{where}: {outcome.reason} from {self.url}")

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
