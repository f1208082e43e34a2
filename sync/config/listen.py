"""``[daemon] http``: where the daemon serves /metrics, /healthz, /readyz and its status page."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

# Prometheus' default-port allocations list 9464 for OpenTelemetry-style exporters; loopback
# so that nothing is exposed unless an operator says so.
DEFAULT_HTTP_ADDRESS = "127.0.0.1:9464"


@dataclass(frozen=True)
class ListenAddress:
    """A host and port to bind (port 0: any free port)."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_listen_address(text: str) -> ListenAddress:
    """``host:port`` (``[::1]:9464`` for IPv6) as a ``ListenAddress``; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f'not an address to listen on: "{text}"; write host:port such as '
            f'"{DEFAULT_HTTP_ADDRESS}", or "" to turn the HTTP server off'
        )
    return ListenAddress(host, int(port))


def check_http_setting(value: Any) -> str:
    """The ``http`` setting as text: ``false`` or ``""`` turn the server off (``""``),
    ``true`` means the default address; any other text must be ``host:port``."""
    if value is False or value == "":
        return ""
    if value is True:
        return DEFAULT_HTTP_ADDRESS
    if not isinstance(value, str):
        raise ValueError(f'write http = "host:port" or false, not {value!r}')
    parse_listen_address(value)
    return value
