"""Destinations: one module per type, each holding its settings model (what its TOML table
validates into), its limits and its implementation, all shaped by ``base``.

Adding a destination type: write ``<type>.py`` with a ``…Settings`` model (a ``type`` literal)
and a ``…Destination`` class, then add it to ``DestinationSettings`` and ``_REGISTRY_LINES``.
The config imports ``DestinationSettings`` from here; nothing here imports the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args

from pydantic import Field

from sync.destinations.base import BaseDestinationSettings, Destination, type_tag
from sync.destinations.file import FileDestination, FileSettings
from sync.destinations.segment import SegmentDestination, SegmentSettings
from sync.destinations.webhook import WebhookDestination, WebhookSettings
from sync.destinations.wishpond import WishpondDestination, WishpondSettings

__all__ = [
    "DESTINATION_TYPES",
    "SETTINGS_TYPES",
    "BaseDestinationSettings",
    "Destination",
    "DestinationSettings",
    "FileSettings",
    "SegmentSettings",
    "WebhookSettings",
    "WishpondSettings",
    "build_destination",
]

_S = TypeVar("_S", bound=BaseDestinationSettings)
_Builder = Callable[[str, Any], Destination]


def _entry(
    settings: type[_S], build: Callable[[str, _S], Destination]
) -> tuple[type[_S], _Builder]:
    """One registry line; mypy checks that ``build`` takes these settings and makes a
    ``Destination``."""
    return settings, build


# The settings of any destination type; the TOML `type` key picks the model.
DestinationSettings = Annotated[
    SegmentSettings | WishpondSettings | WebhookSettings | FileSettings,
    Field(discriminator="type"),
]

# {settings type: how to build its destination}, in the order error messages list the types.
_REGISTRY_LINES = (
    _entry(SegmentSettings, SegmentDestination),
    _entry(WishpondSettings, WishpondDestination),
    _entry(WebhookSettings, WebhookDestination),
    _entry(FileSettings, FileDestination),
)
_REGISTRY: dict[type[BaseDestinationSettings], _Builder] = dict(_REGISTRY_LINES)
SETTINGS_TYPES: tuple[type[BaseDestinationSettings], ...] = tuple(_REGISTRY)
DESTINATION_TYPES: tuple[str, ...] = tuple(type_tag(s) for s in SETTINGS_TYPES)

# A type in one list but not the other would validate but not build, or build but not validate.
if set(get_args(get_args(DestinationSettings)[0])) != set(SETTINGS_TYPES):
    raise AssertionError("DestinationSettings and _REGISTRY_LINES list different settings")


def build_destination(name: str, settings: BaseDestinationSettings) -> Destination:
    """Make the destination called ``name`` (its TOML table name) from its settings."""
    try:
        build = _REGISTRY[type(settings)]
    except KeyError:
        unknown = type(settings).__name__
        raise AssertionError(f"unregistered destination settings {unknown}") from None
    return build(name, settings)
