"""The matching engine -> pushd wire format: msgspec Structs, MessagePack on the wire. No I/O.

``docs/wire.md`` describes the same format for engines written in other languages.

A *frame* is one MessagePack map, an ``Envelope``: who sent it (``src``, ``epoch``), its number
(``seq``: 1, 2, 3, ... per source and epoch) and one or more events. Over UDP one datagram is one
frame. Over TCP each frame is preceded by its length as a 4-byte big-endian unsigned integer.

Events are maps tagged by ``"type"``. Prices and quantities are decimal strings (``"61234.5"``),
never floats, so they stay exact from the engine to the client.

A *sealed* frame (the default ingest mode) wraps that body: a 16-byte header (``PDA1``, ``src``,
the time it was sealed) before it and an HMAC-SHA256 tag, keyed per ``src``, after it; see
``seal`` and ``SealedHeader``.
"""

from __future__ import annotations

import hmac
import struct
from typing import Annotated, Literal, NamedTuple

import msgspec

MAX_DATAGRAM_BYTES = 65_000  # one frame per UDP datagram, at most this size
MAX_FRAME_BYTES = 4 * 1024 * 1024  # one TCP frame (a deep book snapshot fits)
# a TCP connection's first frame, before its peer is admitted (a heartbeat is ~100 bytes):
# a stranger cannot make pushd buffer and MAC 4 MiB per waiting connection
MAX_FIRST_FRAME_BYTES = 64 * 1024
LENGTH_PREFIX = struct.Struct(">I")
SEAL_MAGIC = b"PDA1"  # "pushd, authenticated, version 1": never the first bytes of an envelope
SEAL_HEADER = struct.Struct(">4sIQ")  # magic, src (uint32), sealed at (uint64 ms, Unix epoch)
MAC_BYTES = 32  # HMAC-SHA256
SEAL_OVERHEAD = SEAL_HEADER.size + MAC_BYTES
MIN_KEY_BYTES = 32

Decimal = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]{1,30}(\.[0-9]{1,30})?$")]
Symbol = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Z]{2,32}$")]
Uid = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z][0-9A-Za-z.\-]{0,63}$")]
Millis = Annotated[int, msgspec.Meta(ge=0)]
Level = tuple[Decimal, Decimal]  # (price, quantity)
Side = Literal["buy", "sell"]


class _Event(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=False):
    pass


class Trade(_Event, tag="trade", frozen=True):
    """One match. ``side`` is the taker's side; ``id`` rises per symbol."""

    symbol: Symbol
    id: Annotated[int, msgspec.Meta(ge=0)]
    price: Decimal
    qty: Decimal
    side: Side
    ts: Millis


class OrderUpdate(_Event, tag="order", frozen=True):
    uid: Uid
    symbol: Symbol
    order_id: Annotated[int, msgspec.Meta(ge=0)]
    side: Side
    kind: Literal["limit", "market"]
    price: Decimal
    qty: Decimal
    filled_qty: Decimal
    avg_price: Decimal
    status: Literal["new", "partially_filled", "filled", "canceled", "rejected"]
    ts: Millis
    client_order_id: str = ""
    last_fill_qty: Decimal = "0"
    last_fill_price: Decimal = "0"
    fee: Decimal = "0"


class BalanceUpdate(_Event, tag="balance", frozen=True):
    uid: Uid
    asset: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Z]{1,16}$")]
    free: Decimal
    locked: Decimal
    reason: Literal["order", "fill", "cancel", "funding", "transfer", "fee"]
    ts: Millis


class PositionUpdate(_Event, tag="position", frozen=True):
    """``qty`` is signed: positive long, negative short, 0 flat."""

    uid: Uid
    symbol: Symbol
    qty: Decimal
    entry_price: Decimal
    realized_pnl: Decimal
    ts: Millis


class AccountUpdate(_Event, tag="account", frozen=True):
    """Free-form account fields (equity, margin ratio, ...), all decimal strings or text."""

    uid: Uid
    fields: dict[str, str]
    ts: Millis


class IndexPrice(_Event, tag="index", frozen=True):
    """One spot source's price for the symbol's underlying; pushd aggregates the sources."""

    symbol: Symbol
    source: Annotated[str, msgspec.Meta(max_length=32)]
    price: Decimal
    ts: Millis


class Publish(_Event, tag="publish", frozen=True):
    """A backend's message to a channel it owns (``notice``, ``user_<uid>_<stream>``), as the
    HTTP ``POST /v1/publish`` takes it: ``data`` is the message's JSON text (UTF-8, as MessagePack
    bin: a str would be decoded only to be encoded again), passed to subscribers as it is. Only
    from a source allowed to publish (``backend = true``)."""

    channel: Annotated[str, msgspec.Meta(max_length=128)]
    data: bytes


class Heartbeat(_Event, tag="heartbeat", frozen=True):
    """Nothing to say but "this source is alive": a TCP connection's hello, and what an idle
    sender sends (at least once a second) so that pushd can tell quiet from gone."""


class BookRequest(_Event, tag="book_request", frozen=True):
    symbol: Symbol
    request_id: Annotated[int, msgspec.Meta(ge=0)]
    depth: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500


class BookSnapshot(_Event, tag="book", frozen=True):
    """The engine's book: bids best (highest) first, asks best (lowest) first.

    ``update_id`` is the engine's book version; it only rises.
    """

    symbol: Symbol
    request_id: Annotated[int, msgspec.Meta(ge=0)]
    update_id: Annotated[int, msgspec.Meta(ge=0)]
    bids: list[Level]
    asks: list[Level]
    ts: Millis


Event = (
    Trade
    | OrderUpdate
    | BalanceUpdate
    | PositionUpdate
    | AccountUpdate
    | IndexPrice
    | Publish
    | Heartbeat
    | BookRequest
    | BookSnapshot
)


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """One frame: ``seq`` counts frames per (``src``, ``epoch``), starting at 1. ``ack``: over
    TCP, pushd answers this frame with an ``Ack`` (a backend that waits for its publish)."""

    src: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    epoch: Annotated[int, msgspec.Meta(ge=0)]
    seq: Annotated[int, msgspec.Meta(ge=1)]
    events: Annotated[list[Event], msgspec.Meta(min_length=1)]
    ack: bool = False


class Ack(msgspec.Struct, frozen=True):
    """pushd's answer to a TCP frame that asked for one, once it has dealt with it: the
    frame's ``verdict`` (its events were taken only when ``in_order``, ``gap`` or
    ``restart``) and the events refused (publishes, and private events the source may not
    carry), as (index in ``events``, reason)."""

    src: int
    epoch: int
    seq: int
    verdict: str
    refused: list[tuple[int, str]] = []


class WireError(ValueError):
    """A frame that is not a valid Envelope: truncated, wrong types, too big."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_ack_decoder = msgspec.msgpack.Decoder(Ack)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def encode_event(event: Event) -> bytes:
    """One event alone, to measure it when packing datagrams."""
    return _encoder.encode(event)


def decode(data: bytes | bytearray | memoryview) -> Envelope:
    """Decode one frame. Raises WireError with a one-line reason."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid frame: {exc}") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"undecodable frame: {exc}") from None
    except RecursionError:  # msgspec's answer to nesting past its depth limit
        raise WireError("undecodable frame: nested too deep") from None


def encode_ack(ack: Ack) -> bytes:
    """An ack as pushd sends it on the TCP connection: length-prefixed, not sealed."""
    return length_prefixed(_encoder.encode(ack))


def decode_ack(body: bytes) -> Ack:
    """One ack frame's body (``StreamDecoder.next_body`` splits them). Raises WireError."""
    try:
        return _ack_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise WireError(f"invalid ack: {exc}") from None


def frame_tcp(envelope: Envelope) -> bytes:
    return length_prefixed(encode(envelope))


def length_prefixed(body: bytes) -> bytes:
    """A TCP frame: the body (an envelope, sealed or not) after its 4-byte length."""
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(body)} bytes over {MAX_FRAME_BYTES}")
    return LENGTH_PREFIX.pack(len(body)) + body


class SealedHeader(NamedTuple):
    src: int
    sealed_ms: int


def mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    return hmac.digest(key, data, "sha256")


def seal(body: bytes, src: int, key: bytes, sealed_ms: int) -> bytes:
    """``body`` (an encoded envelope of ``src``) as a sealed frame:
    ``PDA1 | src | sealed_ms | body | HMAC-SHA256(key, everything before)``."""
    signed = SEAL_HEADER.pack(SEAL_MAGIC, src, sealed_ms) + body
    return signed + mac(key, signed)


def is_sealed(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:4]) == SEAL_MAGIC


def sealed_header(data: bytes | bytearray | memoryview) -> SealedHeader:
    """The header of a sealed frame, read *before* it is verified: only to pick the key.

    Raises:
        WireError: too short to hold a header, a tag and a body.
    """
    if len(data) <= SEAL_OVERHEAD:
        raise WireError(f"sealed frame of {len(data)} bytes: too short")
    _, src, sealed_ms = SEAL_HEADER.unpack_from(data)
    return SealedHeader(src, sealed_ms)


def verify(data: bytes | bytearray | memoryview, key: bytes) -> memoryview | None:
    """The body of a sealed frame whose tag is ``key``'s, or None (in constant time)."""
    view = memoryview(data)
    signed, tag = view[:-MAC_BYTES], view[-MAC_BYTES:]
    if not hmac.compare_digest(mac(key, signed), tag):
        return None
    return signed[SEAL_HEADER.size :]


class StreamDecoder:
    """Splits a TCP byte stream into frames, h11-style: ``feed(bytes)``, then ``next_frame()``
    until it returns None.

    A length over ``max_frame`` raises WireError every time from then on: the stream cannot be
    trusted past it, so the connection must be dropped. ``max_frame`` may be raised between
    frames (pushd starts a peer at ``MAX_FIRST_FRAME_BYTES`` and raises it once admitted).
    A frame whose body does not decode raises WireError once and is skipped (its length was
    sound).
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame
        self._broken: WireError | None = None

    def feed(self, data: bytes) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Envelope | None:
        body = self.next_body()
        return None if body is None else decode(body)

    def next_body(self) -> bytes | None:
        """The next frame's bytes, not decoded (a sealed frame is verified before it is)."""
        if self._broken is not None:
            raise self._broken
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(buf, pos)
        if length > self.max_frame:
            self._broken = WireError(f"frame length {length} over {self.max_frame}")
            raise self._broken
        if len(buf) - pos - 4 < length:
            return None
        self._pos = pos + 4 + length
        return bytes(buf[pos + 4 : pos + 4 + length])

    @property
    def broken(self) -> bool:
        """True once the stream lost its framing; the connection must be dropped."""
        return self._broken is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos
