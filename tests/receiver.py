"""A real Segment-compatible HTTP receiver on 127.0.0.1 with programmable behaviour."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    """One canned response for the next request."""

    status: int
    body: str = '{"success": false}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    """One request as received."""

    at: float
    path: str
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any] | None
    status: int


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-request are part of the tests


class Receiver:
    """Accepts ``POST /v1/batch`` (and any other path); records what it accepted."""

    def __init__(self, write_key: str | None = None) -> None:
        self.write_key = write_key
        self.script: list[Scripted] = []
        self.poison: set[str] = set()
        self.delay = 0.0
        # While set to an unset Event, every request waits for it before being answered: a
        # test holds a sender mid-batch for exactly as long as it needs (no timing guesses).
        self.gate: threading.Event | None = None
        self.arrivals = 0  # requests read so far, counted before any gate or delay
        self.requests: list[Request] = []
        self.accepted: list[dict[str, Any]] = []
        self.seen_ids: set[str] = set()
        self.state: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def messages(self) -> list[dict[str, Any]]:
        """Every accepted message, in arrival order (duplicates included)."""
        with self.lock:
            return list(self.accepted)

    def batches(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.status == 200]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.accepted.clear()

    def _respond(self, raw: bytes, headers: dict[str, str], path: str) -> tuple[Scripted, Any]:
        with self.lock:
            scripted = self.script.pop(0) if self.script else None
        if headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return Scripted(400, '{"error": "bad json"}'), None
        if scripted is not None:
            return scripted, body
        if self.write_key is not None and path == "/v1/batch":
            expected = "Basic " + base64.b64encode(f"{self.write_key}:".encode()).decode()
            if headers.get("authorization") != expected:
                return Scripted(401, '{"error": "invalid write key"}'), body
        batch = body.get("batch", [])
        bad = [m for m in batch if (m.get("userId") or m.get("anonymousId")) in self.poison]
        if bad:
            return Scripted(400, f'{{"error": "invalid message {bad[0].get("userId")}"}}'), body
        return Scripted(200, '{"success": true}', delay=self.delay), body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.arrivals += 1
                    gate = receiver.gate
                if gate is not None:
                    gate.wait(timeout=120)
                scripted, body = receiver._respond(raw, headers, self.path)
                if scripted.delay:
                    time.sleep(scripted.delay)
                with receiver.lock:
                    receiver.requests.append(
                        Request(time.monotonic(), self.path, headers, raw, body, scripted.status)
                    )
                    if scripted.status == 200 and body is not None:
                        for message in body.get("batch", []):
                            receiver.accepted.append(message)
                            if message["messageId"] in receiver.seen_ids:
                                continue
                            receiver.seen_ids.add(message["messageId"])
                            who = message.get("userId") or message.get("anonymousId")
                            if message["type"] == "identify":
                                for key, value in message["traits"].items():
                                    receiver.state[(who, key)] = value
                payload = scripted.body.encode()
                self.send_response(scripted.status)
                extra = {"Content-Type": "application/json", **scripted.headers}
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                # The client may have given up (timeout tests): it never sees the answer.
                with contextlib.suppress(OSError):
                    self.wfile.write(payload)

        return Handler

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
