"""What every destination shares: the settings base its TOML table validates into, and the
protocol its implementation follows."""

from __future__ import annotations

from typing import Any, Protocol, get_args

from pydantic import BaseModel, ConfigDict

from sync.messages import MessageMode


class BaseDestinationSettings(BaseModel):
    """Settings every destination type accepts: how its messages are shaped.

    Each subclass adds a ``type: Literal["<tag>"]`` field (the TOML ``type`` key that picks
    it) and its own keys; like every config model it is frozen and rejects unknown keys.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: MessageMode = "identify"
    space_id: str = ""
    namespace: str = ""


def type_tag(settings_type: type[BaseDestinationSettings]) -> str:
    """The ``type = "..."`` value that selects ``settings_type`` in the TOML file."""
    (tag,) = get_args(settings_type.model_fields["type"].annotation)
    return str(tag)


class Destination(Protocol):
    """Where messages go. ``send`` delivers one batch or raises a ``DeliveryError``.

    ``send`` must be safe to call from several threads at once (delivery runs up to
    ``concurrency`` batches in flight).
    """

    name: str
    max_batch_messages: int
    max_batch_bytes: int | None
    max_message_bytes: int | None
    concurrency: int
    requires_user_id: bool
    integrations: dict[str, Any] | None

    def send(self, messages: list[str]) -> None:
        """Deliver one batch of messages, each already encoded as compact JSON; return only
        when the destination acknowledged all of it."""

    def close(self) -> None:
        """Release connections and files."""
