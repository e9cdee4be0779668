"""What every bus speaks: positions in a channel, messages, history, recovery. No I/O.

Each internal channel is one sequence: its messages are numbered 1, 2, 3, ... (``seq``) within
an ``epoch``, a short string that names one unbroken life of that numbering. Whoever keeps the
numbering (this process for the memory bus, Redis for the Redis bus) also keeps a bounded
history of the channel's last messages; a client that knows its last ``(epoch, seq)`` can get
exactly what it missed while history reaches back that far. A new epoch means the numbering and
its history were lost (a restart, an eviction): the client must reload.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec

from pushd.errors import MalformedData

EPOCH_BYTES = 2  # 4 random hex characters after the time: two epochs of one ms still differ
EPOCH_TIME_DIGITS = 12  # hex digits of ms since 1970 (to the year 10889)

_any_json = msgspec.json.Decoder()
_EPOCH = re.compile(f"[0-9a-f]{{{EPOCH_TIME_DIGITS + 2 * EPOCH_BYTES}}}")


def new_epoch(now_ms: int | None = None) -> str:
    """A new epoch: 12 hex digits of its start time (ms since 1970), then 4 random ones.

    Time first, so a later epoch sorts after an earlier one: a dialect that must number its
    updates upward across restarts and epochs (the Binance surface, ``pushd.binance.ids``)
    reads the start time back with ``epoch_ms``. Old epochs (8 random hex digits) read as 0."""
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    return f"{now_ms:0{EPOCH_TIME_DIGITS}x}{secrets.token_hex(EPOCH_BYTES)}"


def epoch_ms(epoch: str) -> int:
    """When ``epoch`` began (ms since 1970), as ``new_epoch`` wrote it; 0 for an epoch of
    another form (written by an older pushd, or by hand into Redis)."""
    if not _EPOCH.fullmatch(epoch):
        return 0
    return int(epoch[:EPOCH_TIME_DIGITS], 16)


def checked(data: bytes | msgspec.Raw) -> msgspec.Raw:
    """``data`` as a message's data, once it is known to be one JSON value in UTF-8 throughout.

    What comes from outside (a backend's publish, whatever Redis hands back) goes through
    here before it gets a seq or reaches the hub: a parser that skips a value (``Raw``) checks
    neither its UTF-8 nor, for bytes read back from Redis, its syntax; decoding it does both."""
    raw = data if isinstance(data, msgspec.Raw) else msgspec.Raw(data)
    try:
        _any_json.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedData(str(exc)) from None
    except RecursionError:  # msgspec's answer to nesting past its depth limit
        raise MalformedData("nested too deep") from None
    return raw


class Position(msgspec.Struct, frozen=True, gc=False):
    """Where a channel stands: the seq of its last message (0 before the first) in an epoch."""

    epoch: str
    seq: int


class Outgoing(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A message to publish: ``data`` is JSON, kept as encoded (encoded here from a Struct, or
    from outside and passed through ``checked``: what reaches a bus is always well-formed).
    ``state`` is the stream's whole state after this message, where the stream is a diff
    stream and a state is due (a depth snapshot every so often), so that nodes without the
    book can serve new subscribers.
    ``archive``: a closed candle, which a bus shared by nodes keeps for their kline history."""

    channel: str
    data: msgspec.Raw
    state: msgspec.Raw | None = None
    archive: bool = False


class Entry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One numbered message of a channel, as delivered and as kept in history."""

    seq: int
    data: msgspec.Raw
    state: msgspec.Raw | None = None


class Recovery(msgspec.Struct, frozen=True, gc=False):
    """The answer to "what did I miss on this channel since ``since``?".

    ``recovered``: ``missed`` holds exactly the messages after ``since`` up to ``position``.
    Otherwise (no ``since``, another epoch, history too short) ``missed`` is empty and the
    subscriber starts from ``position``; a state stream then sends its current state: from
    ``current`` where the bus has it (the state at its seq, then the diffs after it, as the
    Redis bus keeps them for nodes without the book), else from the upstream's ``current``
    (``Upstream``: one process's books).
    """

    position: Position
    recovered: bool
    missed: tuple[Entry, ...] = ()
    current: tuple[Entry, ...] = ()


class Snapshot(msgspec.Struct, frozen=True, gc=False):
    """A state stream's whole state exactly at ``position`` (the seq of the event it is the
    state after): what a fresh subscriber gets first, and what a REST snapshot serves.
    ``data`` is None where the stream has no state yet (``position``: where it stands)."""

    position: Position
    data: msgspec.Raw | None


class Upstream(Protocol):
    """What the hub asks of the node's bus side (``pushd.bus.backplane``): which channels it
    follows, a state for a join that waits for one, and where each channel stands."""

    def interest(self, channel: str) -> None:
        """The hub has its first subscriber on ``channel``."""

    def disinterest(self, channel: str) -> None:
        """The hub has lost its last subscriber on ``channel``."""

    def want_state(self, channel: str) -> None:
        """A join to the diff stream ``channel`` waits for a state: find one (``offer_state``)."""

    def position(self, channel: str) -> Position | None:
        """Where ``channel`` stands as this node knows it now."""

    def current(self, channel: str) -> Snapshot | None:
        """The state a new subscriber of ``channel`` starts from as this node holds it now,
        with data (None: none held here)."""


class Delivery(Protocol):
    """Where a bus delivers a node's messages: the gateway's hub, which satisfies this
    structurally, so no bus imports the gateway (centrifuge's ``BrokerEventHandler``).

    Two deliveries every bus makes, ``publish`` and ``resync``; and, for state streams on
    nodes without the book (the Redis bus's follower only), a third delivery and the one
    question that paces it: ``offer_state`` and ``wants_state``. Nothing else: a bus that
    needs to know more of the hub asks through a protocol of its own (the memory bus's
    ``Subscribed``)."""

    def publish(self, internal: str, epoch: str, seq: int, data: msgspec.Raw) -> int | None:
        """One message to this node's subscribers of ``internal``; returns how many got it,
        or None where no client can be sent it (its data is not UTF-8: anyone with access to
        Redis can publish): then it was dropped, and the channel's subscribers told. A bus
        keeps no history of such a message and counts it."""

    def resync(self, internal: str, at: Position) -> int:
        """Messages of ``internal`` up to ``at`` may not have reached this node: tell its
        subscribers. Returns how many were told."""

    def offer_state(self, internal: str, recovery: Recovery) -> int:
        """A stream's stored state and the diffs after it (``recovery.current``) for the joins
        waiting for one; returns how many started from it. Exists because a join to a diff
        stream on a node without the book cannot start from a message: it waits for a state
        the bus reads from where the publisher stored it."""

    def wants_state(self, internal: str) -> bool:
        """Whether a join to ``internal`` waits for the stream's state. Exists because that
        read is a round trip to Redis: the bus asks before each read and after each live diff
        (it may be the one that stored a state), and only the hub knows when the last waiting
        join started or left (keeping a copy of that in the bus would be state kept twice)."""


class Bus(Protocol):
    """How messages reach the hub of every node (see ``pushd.bus``)."""

    # a diff stream's publisher attaches the whole state to one message in this many (0: none)
    state_every: int

    def publish(self, items: Sequence[Outgoing]) -> int:
        """Hand messages over without blocking; order per channel is kept. Returns how many
        were taken: the first ones, all but those a full outbox dropped."""

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        """Publish and wait until each message has its seq (the HTTP publish API)."""

    def position(self, channel: str) -> Position | None:
        """The channel's position as this node knows it now, or None if it does not."""

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        """What ``channel`` had after ``since``, and where it stands now."""

    def interest(self, channel: str) -> None:
        """This node's hub has its first subscriber on ``channel``."""

    def disinterest(self, channel: str) -> None:
        """This node's hub has lost its last subscriber on ``channel``."""

    def not_ready(self) -> str | None:
        """Why this node cannot deliver now (the broker is unreachable), or None."""


class History:
    """A channel's last messages, bounded by count and by age (``now`` is passed in).

    A list, not a deque: most channels (one per uid) hold a message or two, and a deque
    allocates a 64-slot block for its first one (~600 B a channel)."""

    __slots__ = ("_entries", "_last", "_max_age", "_size")

    def __init__(self, size: int, max_age: float) -> None:
        self._entries: list[tuple[float, Entry]] = []
        self._size = size
        self._max_age = max_age
        self._last = -math.inf  # when the channel last had a message (kept or not)

    def append(self, entry: Entry, now: float) -> None:
        self._last = now
        if self._size:
            entries = self._entries
            entries.append((now, entry))
            if len(entries) > self._size:
                del entries[0]

    @property
    def last(self) -> float:
        """When the channel last had a message (kept or not)."""
        return self._last

    def skip(self, now: float) -> None:
        """A message that is not kept (the hub could not deliver it): the hole it leaves makes
        ``since`` refuse every replay across it (the entries before it no longer line up)."""
        self._last = now

    def idle(self, now: float) -> bool:
        """True when the channel's last message is older than history is kept: whatever it
        kept has expired, and a state stream (which keeps nothing) has been quiet as long."""
        return self._last < now - self._max_age

    def since(self, seq: int, upto: int, now: float) -> tuple[Entry, ...] | None:
        """The entries after ``seq`` up to ``upto``, or None when history no longer reaches
        back to ``seq + 1``. ``upto`` is the channel's current seq."""
        if seq == upto:
            return ()
        if seq > upto or seq < 0:
            return None
        entries = self._entries
        oldest = now - self._max_age
        expired = 0
        while expired < len(entries) and entries[expired][0] < oldest:
            expired += 1
        del entries[:expired]
        count = upto - seq
        if count > len(entries):
            return None
        missed = tuple(entry for _, entry in entries[len(entries) - count :])
        if missed[0].seq != seq + 1:  # a hole (a skipped message) in the window: no replay
            return None
        return missed
