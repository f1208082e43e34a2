"""The test receiver: a real Segment-compatible HTTP server on 127.0.0.1 whose behaviour a test
composes from options, instead of patching it.

Every request is read, counted (`arrivals`), held while `gate` is an unset Event, offered to the
`on_request` hook, then answered by the first of these that applies:

1. a fault: `forced` while set, else a seeded random draw while `fault_rate` > 0 and
   `faults_enabled` (5xx, 429 with or without Retry-After, a connection reset -- all before the
   batch is applied; or the batch is applied and then answered 5xx, answered slowly, or the
   connection reset so the answer is lost);
2. the next `script` entry (a canned `Scripted` answer);
3. 401 when `write_key` is set and a `/v1/batch` request does not carry it;
4. 400 when the body is not JSON, when `strict` and the request breaks Segment's documented
   limits (the problem is appended to `violations`), or when a message's id is in `poison`;
5. otherwise, after waiting `delay` seconds, the batch is applied and answered 200.

Applying a batch appends a `Delivery` per message (duplicates included) and updates `state`
{(who, key): value} from identify traits and track properties, once per messageId (Segment
drops a messageId it has seen). With `order="arrival"` the last message to arrive wins; with
`order="timestamp"` the newest `timestamp` wins, as Segment orders a profile's traits, so a
request that sat in a socket past the client's timeout cannot undo a newer change.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

# Segment HTTP Tracking API limits, checked when `strict`.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID = 100

# Faults answered before the batch is applied: nothing happened at the destination.
REFUSED_FAULTS = ("500", "502", "503", "429", "429-retry-after", "reset")
# Applied, then answered with a 5xx (a gateway timing out on a backend that did the work).
APPLIED_FAULTS = ("applied-500", "applied-502", "applied-503", "applied-504")
# Applied, but the client never sees the answer in time (slow) or at all (lost-200).
FAULTS = (*REFUSED_FAULTS, "slow", "lost-200")


@dataclass
class Scripted:
    """One canned answer; `reset` closes the connection with an RST instead of answering."""

    status: int
    body: str = '{"success": false}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False


@dataclass
class Request:
    """One request as received; `status` is the answer (None: the connection was reset)."""

    at: float
    path: str
    headers: dict[str, str]
    raw: bytes  # as read, before any gzip decompression (what a signature covers)
    body: Any  # the parsed JSON, None if it was not JSON
    status: int | None = None
    fault: str | None = None


@dataclass
class Delivery:
    """One applied message, with whether it was a duplicate by messageId."""

    message: dict[str, Any]
    message_id: str
    who: str
    values: dict[str, Any]
    timestamp: str
    duplicate: bool


OnRequest = Callable[[Request], Scripted | None]

_OK = Scripted(200, '{"success": true}')
_BEFORE: dict[str, Scripted] = {
    "500": Scripted(500, '{"error": "chaos"}'),
    "502": Scripted(502, '{"error": "chaos"}'),
    "503": Scripted(503, '{"error": "chaos"}'),
    "429": Scripted(429, '{"error": "slow down"}'),
    "429-retry-after": Scripted(429, '{"error": "slow down"}', {"Retry-After": "1"}),
    "reset": Scripted(0, "", reset=True),
}


class Receiver:
    """Accepts POSTs on any path; records every request and applies accepted batches.

    Options (all may be changed while it runs): `write_key`, `script`, `poison`, `delay`,
    `gate`, `on_request`, `forced`, `faults_enabled`; see the module docstring for the order
    they apply in. `on_request(request)` is the hook for a test that must act at the moment a
    request arrives (e.g. change the state DB while a batch is in flight): it runs on the
    server's thread after the gate, and answers the request itself by returning a `Scripted`,
    or lets the receiver answer by returning None.
    """

    def __init__(
        self,
        write_key: str | None = None,
        *,
        order: Literal["arrival", "timestamp"] = "arrival",
        strict: bool = False,
        fault_rate: float = 0.0,
        seed: int = 0,
        slow_seconds: float = 0.8,
        on_request: OnRequest | None = None,
    ) -> None:
        self.write_key = write_key
        self.order = order
        self.strict = strict
        self.fault_rate = fault_rate
        self.random = random.Random(seed)
        self.slow_seconds = slow_seconds
        self.faults_enabled = True
        # A fault every request gets while set, whatever faults_enabled and the schedule say.
        self.forced: str | None = None
        self.on_request = on_request
        self.script: list[Scripted] = []
        self.poison: set[str] = set()
        self.delay = 0.0
        # While set to an unset Event, every request waits for it before being answered: a
        # test holds a sender mid-batch for exactly as long as it needs (no timing guesses).
        self.gate: threading.Event | None = None
        self.arrivals = 0  # requests read so far, counted before any gate or delay
        self.requests: list[Request] = []
        self.deliveries: list[Delivery] = []
        self.violations: list[str] = []  # why `strict` refused a request
        self.seen_ids: set[str] = set()
        self.state: dict[tuple[str, str], Any] = {}
        self.stamps: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        """Serve until the block ends."""
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()

    def messages(self) -> list[dict[str, Any]]:
        """Every applied message, in arrival order (duplicates included)."""
        with self.lock:
            return [d.message for d in self.deliveries]

    def batches(self) -> list[Request]:
        """The requests answered 200."""
        with self.lock:
            return [r for r in self.requests if r.status == 200]

    def values(self, key: str) -> dict[str, Any]:
        """The current value of trait ``key`` per member."""
        with self.lock:
            return {who: v for (who, k), v in self.state.items() if k == key}

    def reset(self) -> None:
        """Forget the requests and messages seen so far (not `state` nor `seen_ids`)."""
        with self.lock:
            self.requests.clear()
            self.deliveries.clear()

    def answer(self, request: Request) -> Scripted:
        """The answer to ``request`` by the rules in the module docstring; applies its batch."""
        fault = self._draw_fault()
        request.fault = fault
        if fault in _BEFORE:
            return _BEFORE[fault]
        with self.lock:
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return scripted
        if self.write_key is not None and request.path == "/v1/batch":
            expected = "Basic " + base64.b64encode(f"{self.write_key}:".encode()).decode()
            if request.headers.get("authorization") != expected:
                return Scripted(401, '{"error": "invalid write key"}')
        problem = self._problem(request)
        if problem is not None:
            return Scripted(400, json.dumps({"error": problem}))
        batch = request.body.get("batch", []) if isinstance(request.body, dict) else []
        bad = [m for m in batch if (m.get("userId") or m.get("anonymousId")) in self.poison]
        if bad:
            return Scripted(400, f'{{"error": "invalid message {bad[0].get("userId")}"}}')
        if self.delay:
            time.sleep(self.delay)  # before applying: a client that gives up sees nothing done
        self._apply(batch)
        if fault in APPLIED_FAULTS:
            return Scripted(int(fault.removeprefix("applied-")), '{"error": "gateway"}')
        if fault == "slow":
            return Scripted(200, _OK.body, delay=self.slow_seconds)
        if fault == "lost-200":
            return Scripted(0, "", reset=True)
        return _OK

    def _draw_fault(self) -> str | None:
        with self.lock:
            if self.forced is not None:
                return self.forced
            if not (self.faults_enabled and self.fault_rate):
                return None
            if self.random.random() >= self.fault_rate:
                return None
            return self.random.choice(FAULTS + APPLIED_FAULTS)

    def _problem(self, request: Request) -> str | None:
        """Why the request is refused with a 400, if it is; a `strict` problem is logged."""
        problem: str | None = "body is not JSON"
        if request.body is not None:
            if not self.strict:
                return None
            problem = segment_problem(_decoded(request), request.body)
        if problem is not None and self.strict:
            with self.lock:
                self.violations.append(problem)
        return problem

    def _apply(self, batch: list[dict[str, Any]]) -> None:
        with self.lock:
            for message in batch:
                who: str = message.get("userId") or message.get("anonymousId") or ""
                if message.get("type") == "identify":
                    values = dict(message.get("traits", {}))
                elif message.get("type") == "track":
                    values = dict(message.get("properties", {}))
                    values.pop("audience_key", None)  # names the audience; not a value
                else:
                    values = {}
                message_id = message["messageId"]
                stamp = str(message.get("timestamp", ""))
                duplicate = message_id in self.seen_ids
                self.deliveries.append(Delivery(message, message_id, who, values, stamp, duplicate))
                if duplicate:
                    continue  # Segment drops a messageId it has seen
                self.seen_ids.add(message_id)
                for key, value in values.items():
                    slot = (who, key)
                    if self.order == "timestamp" and stamp < self.stamps.get(slot, ""):
                        continue
                    self.state[slot] = value
                    self.stamps[slot] = stamp

    def _record(self, request: Request, status: int | None) -> None:
        request.at = time.monotonic()
        request.status = status
        with self.lock:
            self.requests.append(request)


def segment_problem(raw: bytes, body: Any) -> str | None:
    """Why Segment would refuse this batch request (its documented limits), or None."""
    if len(raw) > MAX_BATCH_BYTES:
        return f"batch of {len(raw)} bytes"
    batch = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch, list) or not batch:
        return "no batch"
    if len(batch) > MAX_BATCH_MESSAGES:
        return f"{len(batch)} messages in one batch"
    for message in batch:
        size = len(json.dumps(message, separators=(",", ":")).encode())
        if message.get("type") not in ("identify", "track"):
            return f"type {message.get('type')!r}"
        if not (message.get("userId") or message.get("anonymousId")):
            return "neither userId nor anonymousId"
        if size > MAX_MESSAGE_BYTES:
            return f"message of {size} bytes"
        message_id = message.get("messageId")
        if not isinstance(message_id, str) or len(message_id) >= MAX_MESSAGE_ID:
            return f"messageId {message_id!r}"
        if not _is_iso(message.get("timestamp")) or not _is_iso(body.get("sentAt")):
            return "timestamp is not ISO-8601"
    return None


def _is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


def _decoded(request: Request) -> bytes:
    if request.headers.get("content-encoding") == "gzip":
        return gzip.decompress(request.raw)
    return request.raw


def _parsed(request: Request) -> Any:
    try:
        return json.loads(_decoded(request))
    except (ValueError, OSError):  # OSError: not gzip after all
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-request are part of the tests


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes; with Nagle on, the body waits for the
        # client's delayed ACK (~40 ms per request).
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.arrivals += 1
                gate = receiver.gate
            if gate is not None:
                gate.wait(timeout=120)
            request = Request(time.monotonic(), self.path, headers, raw, None)
            request.body = _parsed(request)
            hook = receiver.on_request
            scripted = (hook(request) if hook is not None else None) or receiver.answer(request)
            if scripted.delay:
                time.sleep(scripted.delay)
            if scripted.reset:
                receiver._record(request, None)
                return self._reset()
            receiver._record(request, scripted.status)
            self._reply(scripted)

        def _reply(self, scripted: Scripted) -> None:
            payload = scripted.body.encode()
            self.send_response(scripted.status)
            for name, value in {"Content-Type": "application/json", **scripted.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            # The client may have given up (timeout tests): it never sees the answer.
            with suppress(OSError):
                self.wfile.write(payload)

        def _reset(self) -> None:
            self.close_connection = True
            linger = struct.pack("ii", 1, 0)  # close with an RST, not a FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()

    return Handler
