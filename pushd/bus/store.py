"""Where the Redis bus keeps channels in Redis, and the one place each reply is read.

A channel's keys (``Keys``) share its ``{channel}`` hash tag, so its scripts stay on one
Cluster shard. ``lua/publish.lua`` numbers and stores messages (the publisher's), and
``lua/recover.lua`` reads what a channel had after a position, or its stored state (the
follower's, and REST's). Nothing Redis hands back is trusted: a reply of another shape is
``MalformedData``, an entry or a state that is not well-formed is a hole no replay crosses.
``Store`` makes the reads, with the link's deadline; the rest of the module is sans-IO.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import msgspec
import structlog
import trio

from pushd.bus.link import REDIS_ERRORS, describe
from pushd.bus.model import Entry, Position, Recovery, checked, new_epoch
from pushd.errors import BusUnavailable, MalformedData
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.redis")

META_TTL_S = 7 * 86_400  # an idle channel's numbering is forgotten after a week
DIFF_HISTORY = 128  # depth diffs kept to bridge a stored snapshot to the head
STATE_EVERY = 16  # depth diffs between stored snapshots (< DIFF_HISTORY)
MAX_REPLAY = 10_000  # entries one recover read returns at most
ARCHIVE_SIZE = 1000  # closed candles kept per kline channel (GET /v1/klines on any node)


def lua_script(name: str) -> str:
    """The source of one of the bus's Lua scripts (package data, ``pushd/bus/lua``)."""
    return resources.files("pushd.bus").joinpath("lua", name).read_text(encoding="utf-8")


class Keys:
    """Where one channel lives in Redis. The ``{channel}`` hash tag puts its keys and its
    pub/sub channel in one Cluster slot, so the scripts stay on one shard."""

    __slots__ = ("archive", "hist", "meta", "pubsub")

    def __init__(self, prefix: str, channel: str) -> None:
        tag = f"{prefix}:{{{channel}}}"
        self.meta = f"{tag}:meta"
        self.hist = f"{tag}:hist"
        self.archive = f"{tag}:archive"
        self.pubsub = tag


def text(value: Any) -> str:
    """A string Redis handed back (an epoch), whatever bytes someone stored there."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Recovered(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A ``recover.lua`` reply, its shape and types checked (a Lua false is a None)."""

    epoch: bytes
    seq: int
    state_seq: int | None
    state: bytes | None
    entries: list[Any] | None  # XREVRANGE ... COUNT 0 answers nil


def decode_recovered(reply: Any) -> Recovered:
    """The one place a ``recover.lua`` reply is read: whatever Redis handed back either has
    the script's shape or is malformed data (the caller's resync), never an exception past it."""
    try:
        return msgspec.convert(reply, Recovered)
    except msgspec.ValidationError as exc:
        raise MalformedData(f"recover.lua reply: {exc}") from None


def decode_published(reply: Any) -> tuple[str, int]:
    """The one place a ``publish.lua`` reply is read: ``(epoch, seq of the first)``."""
    try:
        epoch, first = msgspec.convert(reply, tuple[bytes, int])
    except msgspec.ValidationError as exc:
        raise MalformedData(f"publish.lua reply: {exc}") from None
    return text(epoch), first


def recovery_from(since: Position | None, reply: Recovered) -> Recovery:
    """Read a ``recover.lua`` reply: the replay after ``since`` if history holds all of it,
    else the stored state and the diffs after it, if history bridges them. Nothing in it is
    trusted: an entry or a state that is not well-formed is a hole no replay crosses."""
    position = Position(text(reply.epoch), reply.seq)
    state_seq, state = reply.state_seq, reply.state
    entries = [e for item in reversed(reply.entries or ()) if (e := _stream_entry(item))]

    def after(low: int) -> tuple[Entry, ...] | None:
        tail = tuple(e for e in entries if e.seq > low)
        if position.seq < low or [e.seq for e in tail] != list(range(low + 1, position.seq + 1)):
            return None
        return tail

    if since is not None and since.epoch == position.epoch:
        missed = after(since.seq)
        if missed is not None:
            return Recovery(position, recovered=True, missed=missed)
    current: tuple[Entry, ...] = ()
    if state is not None and state_seq is not None and well_formed(state):
        diffs = after(state_seq)
        if diffs is not None:
            current = (Entry(state_seq, msgspec.Raw(state)), *diffs)
    return Recovery(position, recovered=False, current=current)


def _stream_entry(item: Any) -> Entry | None:
    """One XRANGE item, ``[id, fields]``, as an entry (None where it is not one)."""
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        return None
    return entry(item[1])


def well_formed(data: bytes) -> bool:
    try:
        checked(data)
    except MalformedData:
        return False
    return True


def entry(fields: Any) -> Entry | None:
    """A history entry, or None where what is stored is not one (then history has a hole)."""
    try:
        values = (
            fields
            if isinstance(fields, dict)
            else dict(zip(fields[::2], fields[1::2], strict=True))
        )
        seq, data = values[b"s"], values[b"d"]
        if not isinstance(seq, bytes) or not isinstance(data, bytes):
            return None
        return Entry(int(seq), checked(data))
    except (KeyError, ValueError, TypeError):  # MalformedData is a ValueError
        return None


class Store:
    """The reads of what Redis keeps for a channel, on the command link (``attach``), each
    within ``timeout_s``: Redis unreachable is ``BusUnavailable``. What Redis handed back that
    no client could be sent, a reply or a message, is counted here (``malformed``)."""

    def __init__(self, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self._timeout_s = timeout_s
        self.client: Any = None
        self._recover_script: Any = None
        self.malformed = 0  # messages or replies from Redis no client could be sent
        self._malformed_log = ThrottledLog(log, "malformed message from Redis: subscribers told")

    def attach(self, client: Any) -> None:
        """Read through ``client`` (the node's command client, once it exists)."""
        self.client = client
        self._recover_script = client.register_script(lua_script("recover.lua"))

    def keys(self, channel: str) -> Keys:
        return Keys(self.prefix, channel)

    def saw_malformed(self, **fields: object) -> None:
        self.malformed += 1
        self._malformed_log.warning(malformed=self.malformed, **fields)

    async def recover(
        self, keys: Keys, since: Position | None, *, want_state: bool, most: int
    ) -> Recovered:
        """``recover.lua``'s reply: what ``keys``' channel had after ``since`` (at most
        ``most`` entries), and its stored state if ``want_state``."""
        args = [
            str(since.seq) if since is not None else "", since.epoch if since is not None else "",
            new_epoch(), "1" if want_state else "0", META_TTL_S, most,
        ]  # fmt: skip
        try:
            with trio.fail_after(self._timeout_s):
                keys_ = [keys.meta, keys.hist]
                reply = await self._recover_script(keys=keys_, args=args)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        return decode_recovered(reply)

    async def snapshot(self, channel: str) -> tuple[Position, msgspec.Raw | None]:
        """A state stream's stored state and the position it is exact at (REST)."""
        try:
            reply = await self.recover(self.keys(channel), None, want_state=True, most=0)
        except MalformedData as exc:
            self.saw_malformed(channel=channel, error=str(exc)[:200])
            return Position("", 0), None
        epoch = text(reply.epoch)
        if reply.state_seq is None or reply.state is None or not well_formed(reply.state):
            return Position(epoch, 0), None
        return Position(epoch, reply.state_seq), msgspec.Raw(reply.state)

    async def latest_state(self, channel: str) -> Recovery:
        """A diff stream's stored state and the diffs after it (``Recovery.current``), as a
        new subscriber starts from: what REST reads where it must stand where the stream
        stands (the Binance surface's depth, ``pushd.binance.rest``)."""
        try:
            reply = await self.recover(self.keys(channel), None, want_state=True, most=MAX_REPLAY)
        except MalformedData as exc:
            self.saw_malformed(channel=channel, error=str(exc)[:200])
            return Recovery(Position("", 0), recovered=False)
        return recovery_from(None, reply)

    async def history(self, channel: str, most: int) -> tuple[Position, list[Entry]]:
        """An event stream's last ``most`` messages and the position of the last (REST)."""
        keys = self.keys(channel)
        try:
            with trio.fail_after(self._timeout_s):
                epoch = await self.client.hget(keys.meta, "e")
                raw = await self.client.xrevrange(keys.hist, count=most)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        entries = [e for item in reversed(raw or ()) if (e := entry(item.field_values))]
        last = entries[-1].seq if entries else 0
        return Position(text(epoch) if epoch else "", last), entries

    async def archive(self, channel: str, most: int) -> list[msgspec.Raw]:
        """The last ``most`` archived messages of ``channel`` (closed candles), oldest first."""
        try:
            with trio.fail_after(self._timeout_s):
                raw = await self.client.lrange(self.keys(channel).archive, -most, -1)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        return [msgspec.Raw(item) for item in raw if well_formed(item)]
