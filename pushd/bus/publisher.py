"""How messages reach the hubs of the nodes: the Bus interface and its in-memory implementation.

Publishers (the publish API, and the market computations) never talk to a hub directly: they
hand messages to ``Publisher``, which numbers them per channel (the ``seq`` every client sees)
and gives them to the bus; the bus brings them to every node's hub. In one process the bus is a
function call. A bus that crosses processes (Redis) implements the same interface, and uses
``interest``/``disinterest`` to subscribe on demand to the channels its hub has subscribers for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec


class BusMessage(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One event on an internal channel; ``data`` is JSON, kept as encoded."""

    channel: str
    seq: int
    data: msgspec.Raw


class Bus(Protocol):
    def publish(self, messages: Iterable[BusMessage]) -> None:
        """Hand messages over without blocking; delivery order per channel is kept."""

    def interest(self, channel: str) -> None:
        """This node's hub has its first subscriber on ``channel``."""

    def disinterest(self, channel: str) -> None:
        """This node's hub has lost its last subscriber on ``channel``."""


class Publisher:
    """Numbers each channel's messages (1, 2, 3, ...) and hands them to the bus."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._seq: dict[str, int] = {}

    def publish(self, items: Iterable[tuple[str, msgspec.Raw]]) -> list[int]:
        """Publish ``(internal channel, JSON data)`` pairs in order; returns their seqs."""
        seqs = self._seq
        messages = []
        for channel, data in items:
            seq = seqs.get(channel, 0) + 1
            seqs[channel] = seq
            messages.append(BusMessage(channel, seq, data))
        self._bus.publish(messages)
        return [m.seq for m in messages]

    def seq(self, channel: str) -> int:
        """The seq of the channel's last message (0 before the first)."""
        return self._seq.get(channel, 0)

    def publish_one(self, channel: str, data: msgspec.Raw) -> int:
        return self.publish([(channel, data)])[0]
