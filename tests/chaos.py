"""A chaos receiver: a Segment-compatible /v1/batch server on 127.0.0.1 that validates every
request the way Segment documents it and injects faults from a seeded random schedule."""

from __future__ import annotations

import base64
import gzip
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Segment HTTP Tracking API limits.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID = 100

FAULTS = ("500", "502", "503", "429", "429-retry-after", "slow", "reset", "lost-200")
# Applied, then answered with a 5xx (a gateway timing out on a backend that did the work).
APPLIED_FAULTS = ("applied-500", "applied-502", "applied-503", "applied-504")


@dataclass
class Delivery:
    """One accepted message, with whether it was a duplicate by messageId."""

    message_id: str
    who: str
    values: dict[str, Any]
    timestamp: str
    duplicate: bool


@dataclass
class ChaosLog:
    """What the receiver saw."""

    requests: int = 0
    faults: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)


def _is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


class ChaosReceiver:
    """Applies identify traits and track properties per (who, key), de-duplicated by messageId."""

    def __init__(
        self, write_key: str, seed: int = 0, fault_rate: float = 0.3, slow_seconds: float = 0.8
    ) -> None:
        self.write_key = write_key
        self.random = random.Random(seed)
        self.fault_rate = fault_rate
        self.slow_seconds = slow_seconds
        self.faults_enabled = True
        # A fault every request gets while set, whatever faults_enabled and the schedule say.
        self.forced: str | None = None
        self.log = ChaosLog()
        self.state: dict[tuple[str, str], Any] = {}
        self.seen: set[str] = set()
        self.stamps: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def values(self, key: str) -> dict[str, Any]:
        """Final value of trait ``key`` per member."""
        with self.lock:
            return {who: v for (who, k), v in self.state.items() if k == key}

    def _fault(self) -> str | None:
        with self.lock:
            if self.forced is not None:
                return self.forced
            if not self.faults_enabled or self.random.random() >= self.fault_rate:
                return None
            return self.random.choice(FAULTS + APPLIED_FAULTS)

    def validate(
        self, headers: dict[str, str], raw: bytes
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The batch's messages, or why Segment would refuse the request."""
        expected = "Basic " + base64.b64encode(f"{self.write_key}:".encode()).decode()
        if headers.get("authorization") != expected:
            return [], "401"
        if len(raw) > MAX_BATCH_BYTES:
            return [], f"batch of {len(raw)} bytes"
        try:
            body = json.loads(raw)
        except ValueError:
            return [], "body is not JSON"
        batch = body.get("batch")
        if not isinstance(batch, list) or not batch:
            return [], "no batch"
        if len(batch) > MAX_BATCH_MESSAGES:
            return [], f"{len(batch)} messages in one batch"
        for message in batch:
            size = len(json.dumps(message, separators=(",", ":")).encode())
            problem = None
            if message.get("type") not in ("identify", "track"):
                problem = f"type {message.get('type')!r}"
            elif not (message.get("userId") or message.get("anonymousId")):
                problem = "neither userId nor anonymousId"
            elif size > MAX_MESSAGE_BYTES:
                problem = f"message of {size} bytes"
            elif (
                not isinstance(message.get("messageId"), str)
                or len(message["messageId"]) >= MAX_MESSAGE_ID
            ):
                problem = f"messageId {message.get('messageId')!r}"
            elif not _is_iso(message.get("timestamp")) or not _is_iso(body.get("sentAt")):
                problem = "timestamp is not ISO-8601"
            if problem:
                return [], problem
        return batch, None

    def apply(self, batch: list[dict[str, Any]]) -> None:
        with self.lock:
            for message in batch:
                who = message.get("userId") or message["anonymousId"]
                if message["type"] == "identify":
                    values = {k: v for k, v in message["traits"].items() if isinstance(v, bool)}
                else:
                    values = {k: v for k, v in message["properties"].items() if isinstance(v, bool)}
                duplicate = message["messageId"] in self.seen
                self.log.deliveries.append(
                    Delivery(message["messageId"], who, values, message["timestamp"], duplicate)
                )
                if duplicate:
                    continue  # Segment drops a messageId it has seen
                self.seen.add(message["messageId"])
                for key, value in values.items():
                    # Last writer wins by `timestamp`, as Segment orders a profile's traits: a
                    # request that sat in a socket past the client's timeout cannot undo a
                    # newer change when it lands late.
                    stamp = message["timestamp"]
                    if stamp >= self.stamps.get((who, key), ""):
                        self.state[(who, key)] = value
                        self.stamps[(who, key)] = stamp

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def reply(
                self, status: int, body: str = "", headers: dict[str, str] | None = None
            ) -> None:
                payload = body.encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with suppress(OSError):
                    self.wfile.write(payload)

            def reset(self) -> None:
                self.close_connection = True
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                with receiver.lock:
                    receiver.log.requests += 1
                fault = receiver._fault()
                if fault:
                    with receiver.lock:
                        receiver.log.faults.append(fault)
                if fault in ("500", "502", "503"):
                    return self.reply(int(fault), '{"error": "chaos"}')
                if fault == "429":
                    return self.reply(429, '{"error": "slow down"}')
                if fault == "429-retry-after":
                    return self.reply(429, '{"error": "slow down"}', {"Retry-After": "1"})
                if fault == "reset":
                    return self.reset()
                batch, problem = receiver.validate(headers, raw)
                if problem == "401":
                    return self.reply(401, '{"error": "invalid write key"}')
                if problem:
                    with receiver.lock:
                        receiver.log.violations.append(problem)
                    return self.reply(400, json.dumps({"error": problem}))
                receiver.apply(batch)
                if fault in APPLIED_FAULTS:
                    return self.reply(int(fault.removeprefix("applied-")), '{"error": "gateway"}')
                if fault == "slow":
                    time.sleep(receiver.slow_seconds)  # applied, but the client has given up
                    return self.reply(200, '{"success": true}')
                if fault == "lost-200":
                    return self.reset()  # applied; the answer never arrives
                return self.reply(200, '{"success": true}')

        return Handler

    @contextmanager
    def running(self) -> Iterator[ChaosReceiver]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass
