"""Wishpond, reached through Segment by routing each message to it alone.

Segment's catalog lists Wishpond as a browser (device-mode) destination: messages sent from a
server and routed to it are not delivered by Segment. See the README.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import SecretStr

from sync.destinations.segment import SegmentApiSettings, SegmentDestination

# Segment's `integrations` object that routes a message to Wishpond and nowhere else.
WISHPOND_INTEGRATIONS = {"All": False, "Wishpond": True}


class WishpondSettings(SegmentApiSettings):
    """Segment, routing only to Wishpond (see README: Wishpond is browser-only in Segment)."""

    type: Literal["wishpond"]
    merchant_id: str = ""
    tracking_key: SecretStr | None = None

    def routing(self) -> dict[str, Any] | None:
        """Wishpond alone."""
        return dict(WISHPOND_INTEGRATIONS)


class WishpondDestination(SegmentDestination):
    """Segment, routed only to Wishpond; Wishpond needs a userId, so anonymous members skip."""

    requires_user_id = True
