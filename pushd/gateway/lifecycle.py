"""How a connection lives and ends, as values and one state machine. No I/O.

Everything that changes a connection's phase or who writes its socket lives in this file (as
h11's ``_state.py`` holds all of HTTP's): the legal moves are the two tables below, and any
other raises ``LocalStateError`` -- a bug, caught by the connection's error boundary.

A connection ends one way: the gateway's ``end`` with a ``Disconnect`` (centrifuge's
``disconnect.go``: a disconnect is one value). The value names the close code, the reason the
client reads and the log line says, and the ``closed{reason}`` label it is counted under;
``abort`` ones (the peer is gone, or takes no byte) skip the close handshake and end the socket
at once, even one that was closing already.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec
from wsproto.frame_protocol import CloseReason

from pushd.errors import CloseCode, LocalStateError


class Disconnect(msgspec.Struct, frozen=True):
    """Why and how a connection ends."""

    code: int  # the close frame's code (and pushd_close_codes' label)
    reason: str  # the close frame's reason and the "connection closed" log line's
    label: str | None = None  # pushd_connections_closed_by_server{reason=...}; None: not counted
    abort: bool = False  # no close frame: the socket ends now, even while closing
    by: Literal["server", "client"] = "server"  # who began the close handshake
    echo: str = ""  # by="client": its close frame's reason, echoed in the answer (RFC 6455 5.5.1)


SLOW_CONSUMER = Disconnect(
    CloseCode.SLOW_CONSUMER, "slow consumer: outbound buffer full", "slow_consumer"
)
STALLED = Disconnect(
    CloseCode.SLOW_CONSUMER, "slow consumer: no progress writing", "stalled", abort=True
)
RESET = Disconnect(CloseCode.INTERNAL_ERROR, "connection reset while writing", abort=True)
GOING_AWAY = Disconnect(CloseCode.GOING_AWAY, "server shutting down")
KICKED = Disconnect(CloseCode.KICKED, "disconnected by operator")
RATE_LIMITED = Disconnect(CloseCode.RATE_LIMITED, "too many requests", "rate_limited")
TOKEN_EXPIRED = Disconnect(CloseCode.TOKEN_EXPIRED, "token expired", "token_expired")
INTERNAL_ERROR = Disconnect(CloseCode.INTERNAL_ERROR, "internal error", "internal_error")
BROKEN = Disconnect(CloseCode.INTERNAL_ERROR, "internal error", "internal_error", abort=True)
TOO_MANY_FRAMES = Disconnect(CloseCode.RATE_LIMITED, "too many frames", "frame_rate")
TOO_MANY_FRAGMENTS = Disconnect(
    CloseCode.MESSAGE_TOO_BIG, "message in too many fragments", "too_many_fragments"
)
MESSAGE_TIMEOUT = Disconnect(
    CloseCode.POLICY_VIOLATION, "message not finished in time", "message_timeout"
)


def message_too_big(limit: int) -> Disconnect:
    return Disconnect(CloseCode.MESSAGE_TOO_BIG, f"message over {limit} B", "message_too_big")


def protocol_error(code: int, reason: str | None) -> Disconnect:
    """A frame wsproto refused (it names the code: 1002, 1007, ...)."""
    return Disconnect(code, f"protocol error: {reason}"[:200], "protocol_error")


def gone(reason: str) -> Disconnect:
    """The peer went away (or never finished its handshake): nothing more is sent."""
    return Disconnect(CloseReason.ABNORMAL_CLOSURE, reason, abort=True)  # 1006: never sent


def by_client(code: int, reason: str | None) -> Disconnect:
    """The client's close frame: answered with its code and reason (wsproto's
    ``CloseConnection.response``), counted under ``by="client"``."""
    return Disconnect(code, f"client closed ({code})", by="client", echo=reason or "")


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# the phase moves: accepted; ended (by ``end``, a close handshake or an abort); socket closed
PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.HANDSHAKE: frozenset({Phase.OPEN, Phase.CLOSING}),  # a refused one ends too
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Writer(enum.Enum):
    """Who writes the socket now: exactly one at any time, so no lock is needed."""

    SHELL = "shell"  # the connection's own task: handshake answers, the very last bytes
    FLUSHER = "flusher"  # the gateway's flusher, once the connection is open
    DRAIN = "drain"  # the connection's drain task, while the kernel's buffer is full


# the writer moves: open; the kernel's buffer filled; it drained; the connection's task ends
WRITERS: dict[Writer, frozenset[Writer]] = {
    Writer.SHELL: frozenset({Writer.FLUSHER}),
    Writer.FLUSHER: frozenset({Writer.DRAIN, Writer.SHELL}),
    Writer.DRAIN: frozenset({Writer.FLUSHER, Writer.SHELL}),
}


class Lifecycle:
    """One connection's phase, its writer, and how it ends (the first ``Disconnect``)."""

    __slots__ = ("ending", "phase", "writer")

    def __init__(self) -> None:
        # read freely (plain attributes: the flusher reads both per connection per round, a
        # property call would cost more than the test), moved only by the methods below,
        # which check each move against PHASES and WRITERS
        self.phase = Phase.HANDSHAKE
        self.writer = Writer.SHELL
        self.ending: Disconnect | None = None

    @property
    def closing(self) -> bool:
        return self.phase is Phase.CLOSING or self.phase is Phase.CLOSED

    def _to(self, phase: Phase) -> None:
        if phase is not self.phase and phase not in PHASES[self.phase]:
            raise LocalStateError(f"{self.phase.value} -> {phase.value}")
        self.phase = phase

    def opened(self) -> None:
        """The handshake is answered: frames may be queued, the flusher writes them."""
        self._to(Phase.OPEN)
        self.hand_to(Writer.FLUSHER)

    def end(self, disconnect: Disconnect) -> bool:
        """Begin ending with ``disconnect``; False if it was ending already (the first
        disconnect stays the one the connection is closed with and logged under)."""
        if self.closing:
            return False
        self.ending = disconnect
        self._to(Phase.CLOSING)
        return True

    def closed(self) -> None:
        """The socket is closed."""
        self._to(Phase.CLOSED)

    def check_write(self) -> None:
        """Raise unless a frame may be queued now: only while open (wsproto's ``send``)."""
        if self.phase is not Phase.OPEN:
            raise LocalStateError(f"a frame queued while {self.phase.value}")

    def hand_to(self, writer: Writer) -> None:
        if writer is not self.writer and writer not in WRITERS[self.writer]:
            raise LocalStateError(f"writer {self.writer.value} -> {writer.value}")
        self.writer = writer

    def check_writer(self, writer: Writer) -> None:
        if self.writer is not writer:
            raise LocalStateError(f"{writer.value} writes while {self.writer.value} does")
