"""Numbering and packing events into frames, for any sender. No I/O.

``Framer`` numbers frames 1, 2, 3, ... for one source and epoch (a new process = a new epoch, so
pushd tells a restart from a loss). ``pack_datagrams`` fills UDP datagrams greedily up to the
size limit without ever splitting an event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ingest import wire

ENVELOPE_OVERHEAD = 48  # map header, src, epoch, seq, array header: generous


class Framer:
    def __init__(self, src: int, epoch: int | None = None) -> None:
        self.src = src
        self.epoch = time.time_ns() if epoch is None else epoch
        self._seq = 0

    def envelope(self, events: Sequence[wire.Event]) -> wire.Envelope:
        self._seq += 1
        return wire.Envelope(self.src, self.epoch, self._seq, list(events))

    def tcp_frame(self, events: Sequence[wire.Event]) -> bytes:
        return wire.frame_tcp(self.envelope(events))

    def datagrams(
        self, events: Sequence[wire.Event], limit: int = wire.MAX_DATAGRAM_BYTES
    ) -> list[bytes]:
        return [wire.encode(self.envelope(group)) for group in pack_datagrams(events, limit)]


def pack_datagrams(
    events: Sequence[wire.Event], limit: int = wire.MAX_DATAGRAM_BYTES
) -> list[list[wire.Event]]:
    """Group events so that each group's frame stays under ``limit`` bytes.

    Raises:
        WireError: one event alone is too big for a datagram (send it over TCP).
    """
    groups: list[list[wire.Event]] = []
    current: list[wire.Event] = []
    size = ENVELOPE_OVERHEAD
    for event in events:
        event_size = len(wire.encode_event(event))
        if event_size + ENVELOPE_OVERHEAD > limit:
            raise wire.WireError(f"{type(event).__name__} of {event_size} B too big for UDP")
        if current and size + event_size > limit:
            groups.append(current)
            current, size = [], ENVELOPE_OVERHEAD
        current.append(event)
        size += event_size
    if current:
        groups.append(current)
    return groups
