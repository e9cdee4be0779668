"""The embedded default bus: one process, delivery is a direct call into the hub."""

from __future__ import annotations

from collections.abc import Iterable

from pushd.bus.publisher import BusMessage
from pushd.gateway.hub import Hub


class MemoryBus:
    """The embedded default: one process, delivery is a direct call into the hub."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def publish(self, messages: Iterable[BusMessage]) -> None:
        publish = self._hub.publish
        for message in messages:
            publish(message.channel, message.seq, message.data)

    def interest(self, channel: str) -> None:
        pass

    def disinterest(self, channel: str) -> None:
        pass
