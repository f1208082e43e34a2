"""``check --probe`` for destinations: one request per HTTP destination that changes nothing
there, and what its answer (or the failure to get one) says about the configuration.

The request is the one a sync sends, with an empty batch: ``POST {"batch": [], "sentAt": …}``
to the same URL, with the same credentials, headers, signature and gzip. An empty batch
carries no message, so no profile changes; a Segment-compatible collector authenticates the
request before it reads the body, so a wrong write key is a 401 or 403 even where the empty
batch itself would be refused with a 400. (Segment's own API answers 200 for a well-formed
batch whatever the write key; a 200 from it proves the endpoint and TLS, not the key.) A HEAD
request would be simpler, but many receivers answer 405 to it and none checks credentials
on it.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from sync.destinations import build_destination
from sync.destinations.base import BaseDestinationSettings
from sync.destinations.file import FileSettings
from sync.destinations.http import MAX_ERROR_TEXT, api_url
from sync.destinations.segment import SegmentApiSettings
from sync.destinations.webhook import WebhookSettings
from sync.errors import CredentialsRejectedError, RejectedBatchError
from sync.redaction import redact, redact_url

ProbeVerdict = Literal["ok", "dns", "tls", "connect", "timeout", "auth", "http", "file", "skipped"]


@dataclass(frozen=True)
class ProbeResult:
    """What probing one destination found: ``verdict`` is ``ok`` or the kind of problem."""

    destination: str
    url: str
    verdict: ProbeVerdict
    detail: str

    @property
    def ok(self) -> bool:
        """Whether a sync would reach this destination as configured."""
        return self.verdict in ("ok", "skipped")


def probe_destination(name: str, settings: BaseDestinationSettings) -> ProbeResult:
    """Send ``settings``'s destination the request that changes nothing; never raises."""
    if isinstance(settings, FileSettings):
        return _probe_file(name, settings)
    if isinstance(settings, SegmentApiSettings):
        url = api_url(settings.endpoint, "/v1/batch")
    elif isinstance(settings, WebhookSettings):
        url = settings.url
    else:
        return ProbeResult(name, "", "skipped", "not an HTTP destination")
    destination = build_destination(name, settings)
    try:
        # The batch a sync sends, empty: same URL, credentials, headers, signature, gzip.
        destination.send([])
    except Exception as exc:  # every failure is this destination's report, never an abort
        return ProbeResult(name, redact_url(url), *_verdict(exc))
    finally:
        destination.close()
    return ProbeResult(name, redact_url(url), "ok", _ok_detail(settings))


def _ok_detail(settings: BaseDestinationSettings) -> str:
    if isinstance(settings, SegmentApiSettings):
        return "reached; an empty batch was accepted with this write key"
    return "reached; an empty batch was accepted"


def _verdict(exc: BaseException) -> tuple[ProbeVerdict, str]:
    """The kind of problem behind a failed probe, and its one-line reason (redacted)."""
    text = redact(" ".join(str(exc).split()))[:MAX_ERROR_TEXT]
    if isinstance(exc, CredentialsRejectedError):
        return "auth", text
    if isinstance(exc, RejectedBatchError):
        # Authenticated, then the empty batch was refused (RudderStack does): reachable.
        return "ok", f"reached; credentials accepted, the empty batch refused ({text})"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return "tls", f"TLS failure: {redact(str(cause))}"
        if isinstance(cause, socket.gaierror):
            return "dns", f"cannot resolve the host name: {cause.strerror or cause}"
        if isinstance(cause, httpx.TimeoutException):
            return "timeout", f"no answer within the timeout ({type(cause).__name__})"
        cause = cause.__cause__ or cause.__context__
    if "TLS failure" in text or "CERTIFICATE" in text:
        return "tls", text
    if _dns_failure(text):
        return "dns", f"cannot resolve the host name: {text}"
    if "ConnectError" in text or "refused" in text.lower():
        return "connect", text
    return "http", text


# getaddrinfo's messages (glibc, musl, macOS) when a name does not resolve.
_DNS_MESSAGES = (
    "Name or service not known",
    "nodename nor servname",
    "Temporary failure in name resolution",
    "No address associated with hostname",
    "Name does not resolve",
)


def _dns_failure(text: str) -> bool:
    return any(message in text for message in _DNS_MESSAGES)


def _probe_file(name: str, settings: FileSettings) -> ProbeResult:
    """A file destination: its folder must exist (or be creatable) and be writable."""
    path = Path(settings.path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        return ProbeResult(name, str(path), "file", f"{folder} is not writable")
    return ProbeResult(name, str(path), "ok", f"{folder} is writable")
