"""Destinations: one module each, all shaped by ``base.Destination``."""

from __future__ import annotations

from sync.config import Config
from sync.config import FileDestination as FileConfig
from sync.config import SegmentDestination as SegmentConfig
from sync.config import WebhookDestination as WebhookConfig
from sync.config import WishpondDestination as WishpondConfig
from sync.destinations.base import Destination
from sync.destinations.file import FileDestination
from sync.destinations.segment import SegmentDestination, WishpondDestination
from sync.destinations.webhook import WebhookDestination

__all__ = ["Destination", "build_destination"]


def build_destination(config: Config, name: str) -> Destination:
    """Make the destination called ``name`` in the config."""
    settings = config.destinations[name]
    if isinstance(settings, WishpondConfig):
        return WishpondDestination(name, settings)
    if isinstance(settings, SegmentConfig):
        return SegmentDestination(name, settings)
    if isinstance(settings, WebhookConfig):
        return WebhookDestination(name, settings)
    if isinstance(settings, FileConfig):
        return FileDestination(name, settings)
    raise AssertionError(f"unhandled destination type {type(settings).__name__}")
