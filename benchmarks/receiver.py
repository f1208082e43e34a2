"""A fast Segment-compatible receiver for benchmarks, run as its own process.

It parses every body (so malformed JSON is caught), counts messages and distinct messageIds,
checks the Basic auth header and that every message has a messageId and a userId, and answers
200. `GET /stats` returns the counts as JSON; `POST /reset` zeroes them.
"""

from __future__ import annotations

import base64
import gc
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WRITE_KEY = "bench-write-key"
EXPECTED_AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.messages = 0
        self.invalid = 0
        self.ids: set[str] = set()


def serve(port: int = 0, latency: float = 0.0) -> None:
    """Serve on ``port`` (0: any free one, printed), answering each batch after ``latency``
    seconds: a remote API's round trip, which the sender's workers overlap."""
    # Everything this process allocates is acyclic (parsed JSON, id strings); without this, each
    # full collection walks the set of every messageId seen, which at 10M members made the
    # receiver the bottleneck.
    gc.disable()
    stats = Stats()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes; with Nagle on, the body waits for the
        # client's delayed ACK (~40 ms per request).
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            with stats.lock:
                body = {
                    "requests": stats.requests,
                    "messages": stats.messages,
                    "distinct": len(stats.ids),
                    "invalid": stats.invalid,
                }
            self._answer(200, json.dumps(body).encode())

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            if latency and self.path != "/reset":
                time.sleep(latency)  # the simulated network round trip, not synchronisation
            if self.path == "/reset":
                with stats.lock:
                    stats.reset()
                return self._answer(200, b"{}")
            ok = self.headers.get("authorization") == EXPECTED_AUTH
            try:
                batch = json.loads(raw)["batch"]
                ids = [m["messageId"] for m in batch if m.get("userId")]
                ok = ok and len(ids) == len(batch)
            except (ValueError, KeyError, TypeError):
                ok, batch, ids = False, [], []
            with stats.lock:
                stats.requests += 1
                if not ok:
                    stats.invalid += 1
                else:
                    stats.messages += len(batch)
                    stats.ids.update(ids)
            self._answer(
                200 if ok else 400, b'{"success": true}' if ok else b'{"error": "invalid"}'
            )

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    serve(
        int(sys.argv[1]) if len(sys.argv) > 1 else 0,
        float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0,
    )
