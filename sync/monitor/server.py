"""The daemon's HTTP server (stdlib, one thread per request): ``/metrics`` (Prometheus),
``/healthz`` (the process answers), ``/readyz`` (the state DB answers and the scheduler runs),
``/`` and ``/computations/KEY`` (the status page). Read-only: only GET."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text

from sync.config import Config
from sync.config.listen import ListenAddress
from sync.errors import UnknownAudienceError, error_line
from sync.monitor.metrics import Metrics
from sync.monitor.pages import computation_page, overview_page
from sync.redaction import redact

logger = logging.getLogger("sync.monitor")

HTML = "text/html; charset=utf-8"
PLAIN = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` checks besides the state DB: whether the scheduler is running."""

    scheduler_running: Callable[[], bool]


class MonitorServer:
    """Serves one daemon's metrics, health and status page until ``stop``."""

    def __init__(
        self,
        address: ListenAddress,
        *,
        config: Config,
        engine: Engine,
        metrics: Metrics,
        readiness: Readiness,
        daemon_id: str,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.readiness = readiness
        self.daemon_id = daemon_id
        monitor = self

        class Handler(_Handler):
            server_monitor = monitor

        server_class = _IPv6Server if ":" in address.host else ThreadingHTTPServer
        self._server = server_class((address.host, address.port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the server listens (the real port when configured with port 0)."""
        host, port = str(self._server.server_address[0]), self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="monitor-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    # --- what each path answers ------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Whether the daemon can do its work, with one line per check."""
        lines = []
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
                connection.rollback()
            lines.append("state database: reachable")
            database = True
        except Exception as exc:
            lines.append(f"state database: unreachable: {redact(error_line(exc))}")
            database = False
        running = self.readiness.scheduler_running()
        lines.append(f"scheduler: {'running' if running else 'not running'}")
        return database and running, lines

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for a GET of ``path``."""
        route = urlsplit(path).path
        if route == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if route == "/healthz":
            return 200, PLAIN, b"ok\n"
        if route == "/readyz":
            ok, lines = self.ready()
            body = ("ready\n" if ok else "not ready\n") + "\n".join(lines) + "\n"
            return (200 if ok else 503), PLAIN, body.encode()
        if route == "/":
            with self.engine.connect() as connection:
                page = overview_page(connection, self.config, self.daemon_id)
                connection.rollback()
            return 200, HTML, page.encode()
        if route.startswith("/computations/") and route.count("/") == 2:
            key = unquote(route.removeprefix("/computations/"))
            try:
                with self.engine.connect() as connection:
                    page = computation_page(connection, self.config, key)
                    connection.rollback()
            except UnknownAudienceError as exc:
                return 404, PLAIN, f"{redact(str(exc))}\n".encode()
            return 200, HTML, page.encode()
        return 404, PLAIN, b"not found: try /, /metrics, /healthz or /readyz\n"


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_monitor: MonitorServer
    server_version = "audience-sync"

    def do_GET(self) -> None:
        try:
            status, content_type, body = self.server_monitor.answer(self.path)
        except Exception as exc:
            logger.error("status page %s: %s", self.path, error_line(exc))
            status, content_type, body = 500, PLAIN, f"{redact(error_line(exc))}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)
