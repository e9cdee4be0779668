"""Numbering, sealing and packing events into frames, for any sender. No I/O.

``Framer`` numbers frames 1, 2, 3, ... for one source and epoch (a new process = a new epoch, so
pushd tells a restart from a loss) and, given the source's key, seals each one (``wire.seal``:
the header and HMAC pushd checks before it trusts a byte of the body). ``pack_datagrams`` fills
UDP datagrams greedily up to the size limit without ever splitting an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ingest import wire

ENVELOPE_OVERHEAD = 48  # map header, src, epoch, seq, array header: generous


class Framer:
    """Frames of one source. ``key`` None: unsealed frames (only for a pushd configured with
    ``ingest.allow_unauthenticated``); ``clock`` gives the Unix time in ns (epoch, seal time)."""

    def __init__(
        self,
        src: int,
        epoch: int | None = None,
        key: bytes | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if key is not None and len(key) < wire.MIN_KEY_BYTES:
            raise ValueError(f"a source key has at least {wire.MIN_KEY_BYTES} bytes")
        self.src = src
        self.epoch = clock() if epoch is None else epoch
        self.key = key
        self._clock = clock
        self._seq = 0

    @property
    def seq(self) -> int:
        """The last frame's number (0 before the first)."""
        return self._seq

    def envelope(self, events: Sequence[wire.Event], ack: bool = False) -> wire.Envelope:
        self._seq += 1
        return wire.Envelope(self.src, self.epoch, self._seq, list(events), ack)

    def frame(self, events: Sequence[wire.Event], ack: bool = False) -> bytes:
        """One frame's bytes (a datagram, or a TCP frame's body): sealed when there is a key.
        ``ack``: pushd answers it (TCP only; see ``wire.Ack``)."""
        body = wire.encode(self.envelope(events, ack))
        if self.key is None:
            return body
        return wire.seal(body, self.src, self.key, self._clock() // 1_000_000)

    def tcp_frame(self, events: Sequence[wire.Event], ack: bool = False) -> bytes:
        return wire.length_prefixed(self.frame(events, ack))

    def datagrams(
        self, events: Sequence[wire.Event], limit: int = wire.MAX_DATAGRAM_BYTES
    ) -> list[bytes]:
        if self.key is not None:
            limit -= wire.SEAL_OVERHEAD
        return [self.frame(group) for group in pack_datagrams(events, limit)]

    def heartbeat(self) -> bytes:
        """A frame that only says the source is alive (a TCP hello, an idle sender's beat)."""
        return self.frame([wire.Heartbeat()])


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
