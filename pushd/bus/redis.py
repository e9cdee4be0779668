"""The Redis bus: many processes and machines share channels through one Redis (or a Cluster).

Publishing
    Messages go through one Lua script (``lua/publish.lua``) that, atomically, bumps the
    channel's seq in its meta hash (creating the hash with a new epoch if it is missing),
    appends the messages to the channel's bounded history stream and PUBLISHes (SPUBLISH on a
    Cluster) ``["<epoch>",<first seq>,[<data>,...]]``: consecutive messages of one channel in
    one call and one pub/sub message. Publishers queue messages in an outbox that one task
    sends in pipelined batches. While Redis is unreachable the outbox keeps up to
    ``bus.redis.outage_buffer`` messages, then drops new ones (counted); ``/readyz`` says why.

Subscribing
    A node SUBSCRIBEs to a channel when its hub gets the channel's first subscriber and
    UNSUBSCRIBEs when the last leaves, each channel through one explicit state
    (``follow.py``): a subscribe during an unsubscribe waits for it, and messages reach the
    hub only for channels Redis confirmed and the hub wants. Pub/sub has connections of its
    own, named ``<name>:data`` and ``<name>:control`` (``CLIENT LIST``), never lent to
    commands; one that ends is discarded with every subscription on it, and the next one
    subscribes exactly what the hub wants. Every connection is PINGed by pushd itself
    (``link.py``): one silent for ``timeout_s`` is dead, the node not ready, and it is
    replaced the same way. A joining client is kept *pending* by the hub while this
    bus asks Redis (``lua/recover.lua``, after the SUBSCRIBE is confirmed) for what it missed
    or for the stream's state; the hub merges the answer with the live events by seq.

Keeping the node's stream whole
    Each channel's last delivered position is tracked here. A message whose seq jumps past it
    (Redis pub/sub is at-most-once: a reconnect loses what was published meanwhile) holds the
    channel while the gap is read from history; if history no longer has it, the hub tells the
    channel's subscribers (current state or a resync notice). After a reconnect every channel
    is checked the same way, so an outage costs clients a replay, or at worst a notice, never
    a silent hole.

State streams on nodes without the book
    The compute side stores each stream's state in the meta hash: every ticker, kline and
    markPrice event is the whole state; depth attaches a snapshot every ``STATE_EVERY`` diffs
    and the history bridges the diffs after it. A new subscriber gets that state and diffs.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import anyio
import coredis
import coredis.exceptions
import msgspec
import structlog
import trio
from coredis._utils import hash_slot
from coredis.connection import TCPLocation
from coredis.patterns.pubsub import ClusterPubSub, PubSub

from pushd.backoff import Backoff
from pushd.bus.follow import Action, Following, State
from pushd.bus.link import REDIS_ERRORS as REDIS_ERRORS  # (lease.py and others import it here)
from pushd.bus.link import Check, Cluster, ClusterPool, Link, Pool, ShardedPubSub, watch
from pushd.bus.model import Delivery, Entry, Outgoing, Position, Recovery, checked, new_epoch
from pushd.channels import StateKind, state_kind
from pushd.config import BusConfig
from pushd.errors import BusUnavailable, MalformedData
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.redis")

META_TTL_S = 7 * 86_400  # an idle channel's numbering is forgotten after a week
DIFF_HISTORY = 128  # depth diffs kept to bridge a stored snapshot to the head
STATE_EVERY = 16  # depth diffs between stored snapshots (< DIFF_HISTORY)
MAX_REPLAY = 10_000  # entries one recover read returns at most
MAX_HELD = 10_000  # live messages of one channel held while a gap is read; past it, a resync
ARCHIVE_SIZE = 1000  # closed candles kept per kline channel (GET /v1/klines on any node)
BATCH = 512  # messages per pipelined round trip
BACKOFF_S = (0.05, 2.0)  # reconnect backoff: first, most

_message = msgspec.json.Decoder(tuple[str, int, list[msgspec.Raw]])  # epoch, first seq, data


def describe(exc: BaseException) -> str:
    """One short line for a log or a reply: the error's type and message (the first one
    inside a group: a nursery's wrapping says nothing)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]


def lua_script(name: str) -> str:
    """The source of one of the bus's Lua scripts (package data, ``pushd/bus/lua``)."""
    return resources.files("pushd.bus").joinpath("lua", name).read_text(encoding="utf-8")


def _pending_messages(ps: Any) -> Callable[[], Iterator[Any]]:
    """What coredis's pub/sub object has received and not handed out yet, without waiting
    (its ``get_message`` yields to the scheduler once per message)."""
    stream = getattr(ps, "_receive_stream", None)

    def pending() -> Iterator[Any]:
        if stream is None:  # another coredis: one message per get_message, still correct
            # (pinned for coredis 6.9 by tests/test_link.py)
            return
        while True:
            try:
                yield stream.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return

    return pending


_PUBLISH_LUA = lua_script("publish.lua")


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
        diffs = after(int(state_seq))
        if diffs is not None:
            current = (Entry(int(state_seq), msgspec.Raw(state)), *diffs)
    return Recovery(position, recovered=False, current=current)


def _stream_entry(item: Any) -> Entry | None:
    """One XRANGE item, ``[id, fields]``, as an entry (None where it is not one)."""
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        return None
    return _entry(item[1])


def well_formed(data: bytes) -> bool:
    try:
        checked(data)
    except MalformedData:
        return False
    return True


def _entry(fields: Any) -> Entry | None:
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


def _connections(ps: Any) -> list[Any]:
    """The connections of a pub/sub session (one per shard on a Cluster)."""
    connections = list(getattr(ps, "shard_connections", {}).values())
    with contextlib.suppress(Exception):  # a plain pub/sub that got no connection: none
        connections.append(ps.connection)
    return connections


def _discard(ps: Any) -> None:
    """End a pub/sub session's connections for good: one handed back to a pool would still
    carry what it was subscribed to, and the next borrower would get that (issue 19, item 5)."""
    for connection in _connections(ps):
        connection.invalidate("pub/sub session ended")


def _pings(ps: Any) -> list[Check]:
    """A check for each connection of a pub/sub session (PING is answered in subscribed mode
    too; any byte the connection receives meanwhile counts as life)."""
    return [
        Check(functools.partial(_ping, connection), functools.partial(_quiet, connection))
        for connection in _connections(ps)
    ]


async def _ping(connection: Any) -> None:
    # no deadline of coredis's (timeout_s): the probe's rule decides when a PONG is too late
    await connection.create_request(b"PING", timeout=math.inf)


def _quiet(connection: Any) -> float:
    """Seconds since ``connection`` last received a byte (or was opened)."""
    statistics = connection.statistics
    heard: float = max(statistics.last_byte_received_at, statistics.connected_at)
    return time.perf_counter() - heard


class Carrier(msgspec.Struct, frozen=True):
    """The Redis connection a followed channel is delivered on (its ``CLIENT LIST`` entry)."""

    name: str
    client_id: int
    host: str
    port: int


class _Feed:
    """This node's view of one channel it is subscribed to."""

    __slots__ = ("held", "keys", "kind", "position", "reading_state", "state_again", "subscribed")

    def __init__(self, keys: Keys, kind: StateKind) -> None:
        self.keys = keys
        self.kind = kind
        self.position: Position | None = None  # the last message delivered to the hub
        self.held: list[tuple[str, int, msgspec.Raw]] | None = None  # while a gap is read
        self.subscribed = trio.Event()
        self.reading_state = False  # a read of the stored state for waiting joins is under way
        self.state_again = False  # a message arrived meanwhile: read again if none was found


class _Waiter:
    """A confirmed publish: every one of its messages carries it."""

    __slots__ = ("count", "done", "error", "positions")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.positions: list[Position] = []
        self.error: str | None = None


class RedisBus:
    state_every = STATE_EVERY  # depth publishes carry a snapshot this often

    def __init__(self, hub: Delivery, config: BusConfig) -> None:
        self._hub = hub
        self._config = config.redis
        self._history_size = config.history_size
        self._history_age_ms = int(config.history_age_s * 1000)
        self._cluster = config.redis.cluster
        self._publish_command = "spublish" if self._cluster else "publish"
        self.prefix = config.redis.prefix
        self._pubsub_head = f"{self.prefix}:{{".encode()  # what every pub/sub name starts with
        self._outbox: deque[tuple[Outgoing, _Waiter | None]] = deque()
        self._outbox_wanted = trio.Event()
        self._sent = trio.Event()  # set (and replaced) after each batch Redis took
        self._feeds: dict[str, _Feed] = {}
        self._whole: dict[str, tuple[Position, msgspec.Raw]] = {}  # WHOLE streams' last state
        self._following = Following()  # each channel's state in Redis (follow.py)
        self._commands: trio.MemorySendChannel[tuple[Action, str]] | None = None  # this link's
        self._acked = trio.Event()  # set (and replaced) when a channel's state changed
        self._ps: Any = None  # the pub/sub session now, to say which connection carries what
        self._rejoining: set[str] = set()  # subscribed again by this session, not confirmed yet
        self._nursery: trio.Nursery | None = None
        self.client: Any = None
        self._data_client: Any = None  # pub/sub of the channels only
        self._control_client: Any = None  # pub/sub of the control channel only
        self.name = f"{config.redis.prefix}-{secrets.token_hex(4)}"  # in CLIENT LIST
        self.data_name = f"{self.name}:data"
        self.control_name = f"{self.name}:control"
        self._publish_sha: str | None = None  # loaded before a batch, after every failure
        self._recover_script: Any = None
        self._publisher_up = False
        # the connections this node holds, each checked by a probe of its own (link.py)
        # (``subscribe``: the pub/sub connections of the channels, ``<name>:data`` in Redis)
        self._links = {name: Link(name) for name in ("commands", "subscribe")}
        self._link_changed = trio.Event()  # set (and replaced) when either link goes up or down
        self.published = 0
        self.dropped = 0  # messages refused while the outbox was full (Redis unreachable)
        self.gaps = 0  # jumps in a channel's seqs seen by this node
        self.recovered_gaps = 0
        self.resyncs = 0  # gaps history could not fill: subscribers told
        self.duplicates = 0
        self.malformed = 0  # messages from Redis no client could be sent: dropped, resync
        self._drop_log = ThrottledLog(log, "Redis unreachable: outbox full, messages dropped")
        self._gap_log = ThrottledLog(log, "channel gap not in history: subscribers told")
        self._malformed_log = ThrottledLog(log, "malformed message from Redis: subscribers told")

    # -- the Bus interface ------------------------------------------------------------------

    def publish(self, items: Sequence[Outgoing]) -> None:
        room = self._config.outage_buffer - len(self._outbox)
        if room < len(items):
            self.dropped += len(items) - max(room, 0)
            self._drop_log.warning(dropped=self.dropped, outbox=len(self._outbox))
            items = items[: max(room, 0)]
        self._outbox.extend((item, None) for item in items)
        if items:
            self._outbox_wanted.set()

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        if not items:
            return []
        if not self.publisher_up:
            raise BusUnavailable("Redis unreachable")
        waiter = _Waiter(len(items))
        self._outbox.extend((item, waiter) for item in items)
        self._outbox_wanted.set()
        with trio.move_on_after(self._config.timeout_s * 2):
            await waiter.done.wait()
        if not waiter.done.is_set() or waiter.error is not None:
            raise BusUnavailable(waiter.error or "Redis did not answer in time")
        return waiter.positions

    def position(self, channel: str) -> Position | None:
        feed = self._feeds.get(channel)
        return feed.position if feed is not None else None

    def current(self, channel: str) -> tuple[Position, msgspec.Raw] | None:
        """The last state of a whole-state stream this node follows (``RedisBackplane.current``:
        what the hub sends a subscriber that lagged)."""
        return self._whole.get(channel)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        feed = self._feeds.get(channel)
        if feed is None:  # the subscriber left before we got here
            return Recovery(Position("", 0), recovered=False)
        with trio.move_on_after(self._config.timeout_s):
            await feed.subscribed.wait()
        if not feed.subscribed.is_set():
            raise BusUnavailable("Redis pub/sub is not connected")
        recovery = await self._read(feed, since, want_state=feed.kind is not StateKind.EVENTS)
        if feed.position is None and self._feeds.get(channel) is feed:
            # the hub's subscribers have the stream up to here: a reconnect checks from here
            # (else a channel that got no live message yet would not be checked, and what was
            # published while the node was cut off would be silently missing: issue 19)
            feed.position = recovery.position
        if feed.kind is StateKind.WHOLE and recovery.current:
            self._keep_whole(channel, recovery.position.epoch, recovery.current[-1])
        return recovery

    async def snapshot(self, channel: str) -> tuple[Position, msgspec.Raw | None]:
        """A state stream's stored state and the position it is exact at (REST)."""
        keys = Keys(self.prefix, channel)
        try:
            reply = await self._recover_reply(keys, None, want_state=True, most=0)
        except MalformedData as exc:
            self._on_malformed_reply(channel, exc)
            return Position("", 0), None
        epoch = text(reply.epoch)
        if reply.state_seq is None or reply.state is None or not well_formed(reply.state):
            return Position(epoch, 0), None
        return Position(epoch, reply.state_seq), msgspec.Raw(reply.state)

    async def history(self, channel: str, most: int) -> tuple[Position, list[Entry]]:
        """An event stream's last ``most`` messages and the position of the last (REST)."""
        keys = Keys(self.prefix, channel)
        try:
            with trio.fail_after(self._config.timeout_s):
                epoch = await self.client.hget(keys.meta, "e")
                raw = await self.client.xrevrange(keys.hist, count=most)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        entries = [e for entry in reversed(raw or ()) if (e := _entry(entry.field_values))]
        last = entries[-1].seq if entries else 0
        return Position(text(epoch) if epoch else "", last), entries

    async def archive(self, channel: str, most: int) -> list[msgspec.Raw]:
        """The last ``most`` archived messages of ``channel`` (closed candles), oldest first."""
        keys = Keys(self.prefix, channel)
        try:
            with trio.fail_after(self._config.timeout_s):
                raw = await self.client.lrange(keys.archive, -most, -1)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        return [msgspec.Raw(item) for item in raw if well_formed(item)]

    def interest(self, channel: str) -> None:
        self._feeds[channel] = _Feed(Keys(self.prefix, channel), state_kind(channel))
        self._act(channel, self._following.want(channel))

    def disinterest(self, channel: str) -> None:
        self._feeds.pop(channel, None)
        self._whole.pop(channel, None)
        self._act(channel, self._following.drop(channel))

    def carriers(self) -> dict[str, Carrier]:
        """For every channel this node follows, the connection Redis delivers it on."""
        ps = self._ps
        if ps is None:
            return {}
        carried = {}
        for channel in self._following.following():
            pubsub = Keys(self.prefix, channel).pubsub
            if self._cluster:  # the shard's connection, found as ShardedPubSub routes
                layout = self._data_client.connection_pool.cluster_layout
                node = layout.node_for_slot(hash_slot(pubsub.encode()))
                connection = ps.shard_connections[node.node_id]
            else:
                connection = ps.connection
            location = connection.location
            carried[channel] = Carrier(
                self.data_name, connection.client_id, location.host, location.port
            )
        return carried

    async def settled(self) -> None:
        """Return once the pub/sub link is up and Redis confirmed every command sent: then
        it carries exactly the channels the hub wants."""
        while not (self._following.link_up and self._following.settled()):
            await self._acked.wait()

    def link(self, name: str) -> Link:
        """The state of one of this node's links to Redis; a new name (``control``, for
        whoever listens) is a link the node is not ready without."""
        return self._links.setdefault(name, Link(name))

    def _mark(self, link: Link, up: bool, reason: str = "") -> None:
        was = link.up
        link.mark(up, reason)
        self._changed(was, up)

    async def _watch(self, pings: Callable[[], Any]) -> None:
        """Probe a session's connections until one is dead: then the session ends."""
        await watch(pings, self._config.probe_interval_s, self._config.timeout_s)

    @contextlib.asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Any]:
        """A plain pub/sub session on ``channel`` (the control plane's), on a connection that
        carries nothing else, probed (a dead one ends the session) and discarded after."""
        link = self.link("control")
        pool = self._control_client.connection_pool
        cls = ClusterPubSub if self._cluster else PubSub
        timeout = self._config.timeout_s
        try:
            async with cls(
                pool, ignore_subscribe_messages=True, retry_policy=None,
                subscription_timeout=timeout, unsubscription_timeout=timeout,
            ) as ps:  # fmt: skip
                try:
                    await ps.subscribe(channel)
                    self._mark(link, True)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch, functools.partial(_pings, ps))
                        yield ps
                        nursery.cancel_scope.cancel()
                finally:
                    _discard(ps)
        except Exception as exc:  # (a group too) the link is down until listened to again
            self._mark(link, False, describe(exc))
            raise

    @property
    def publisher_up(self) -> bool:
        return self._publisher_up

    @publisher_up.setter
    def publisher_up(self, up: bool) -> None:
        self._publisher_up, was = up, self._publisher_up
        self._changed(was, up)

    @property
    def subscriber_up(self) -> bool:
        return self._links["subscribe"].up

    @subscriber_up.setter
    def subscriber_up(self, up: bool) -> None:
        self._mark(self._links["subscribe"], up)

    def links(self) -> dict[str, bool]:
        """Whether each of this node's links to Redis is up, by name (``pushd_bus_up``)."""
        return {"publish": self.publisher_up} | {n: link.up for n, link in self._links.items()}

    def _changed(self, was: bool, up: bool) -> None:
        if was != up:  # wake whoever waits for the links
            self._link_changed.set()
            self._link_changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of a link's state (up or down)."""
        await self._link_changed.wait()

    async def wait_ready(self) -> None:
        """Return once every link to Redis is up."""
        while self.not_ready() is not None:
            await self._link_changed.wait()

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    async def drain(self, timeout_s: float) -> None:
        """Wait until the outbox is sent, or Redis is down, or ``timeout_s`` passed."""
        with trio.move_on_after(timeout_s):
            while self._outbox and self.publisher_up:
                await self._sent.wait()

    def not_ready(self) -> str | None:
        down = [f"{link.name} link: {link.reason}" for link in self._links.values() if not link.up]
        if not self.publisher_up:
            down.insert(0, "publishing paused")
        return f"Redis unreachable ({'; '.join(down)})" if down else None

    # -- the Trio shell ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; Redis being unreachable is a state, not an error."""
        client: Any
        self.client = client = self._client(f"{self.name}:commands")
        # pub/sub on clients (pools) of their own: a pool lends a connection to whoever asks
        # next, and a pub/sub connection must never be lent to anyone
        self._data_client = self._client(self.data_name)
        self._control_client = self._client(self.control_name)
        self._recover_script = client.register_script(lua_script("recover.lua"))
        async with client, self._data_client, self._control_client, trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._subscriber)
            nursery.start_soon(self._probe_commands)
            task_status.started()

    async def _probe_commands(self) -> None:
        """PING the command connections (every node's on a Cluster) forever; a dead one is
        replaced: the pool's connections are closed, the next command opens a new one."""
        link = self._links["commands"]
        backoff = Backoff(*BACKOFF_S)  # while down: a new connection is tried at once
        while True:
            try:
                with trio.fail_after(self._config.timeout_s):
                    await self.client.ping()
                if not link.up:
                    log.info("Redis link up", link="commands")
                self._mark(link, True)
            except trio.TooSlowError:
                error = f"no answer to PING within {self._config.timeout_s:g} s"
                if link.up:
                    log.warning("Redis link dead: replacing it", link="commands", error=error)
                self._mark(link, False, error)
                self.client.connection_pool.disconnect()
            except REDIS_ERRORS as exc:
                self._mark(link, False, describe(exc))
            if link.up:
                backoff.reset()
            await trio.sleep(self._config.probe_interval_s if link.up else backoff.next())

    def _client(self, name: str) -> Any:
        timeout = self._config.timeout_s
        options: dict[str, Any] = {
            "stream_timeout": timeout, "connect_timeout": timeout, "decode_responses": False,
        }  # fmt: skip
        if self._cluster:  # from_url of a cluster warns (coredis 6.9): give the node itself
            url = urlsplit(self._config.url)
            # (the cluster client takes no client_name: its pool does)
            named_pool: Any = functools.partial(ClusterPool, client_name=name)
            return Cluster(
                startup_nodes=[TCPLocation(url.hostname or "127.0.0.1", url.port or 6379)],
                username=url.username, password=url.password,
                ssl=url.scheme == "rediss", **options,
                connection_pool_cls=named_pool,
            )  # fmt: skip
        pool = Pool.from_url(self._config.url, client_name=name, **options)
        return coredis.Redis(connection_pool=pool, decode_responses=False)

    async def _publisher(self) -> None:
        backoff = BACKOFF_S[0]
        while not self.publisher_up:  # know whether Redis answers before anything is sent
            try:
                with trio.fail_after(self._config.timeout_s):
                    await self.client.ping()
                self.publisher_up = True
            except REDIS_ERRORS as exc:
                log.warning("Redis unreachable", url=self._config.url, error=describe(exc))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
        while True:
            await self._outbox_wanted.wait()
            if not self._outbox:
                self._outbox_wanted = trio.Event()
                continue
            count = min(BATCH, len(self._outbox))
            while (
                count < len(self._outbox)
                and self._outbox[count][1] is not None
                and (self._outbox[count][1] is self._outbox[count - 1][1])
            ):  # a confirmed batch (HTTP) goes in one round trip, never split across two
                count += 1
            batch = [self._outbox[i] for i in range(count)]
            try:
                results = await self._send(batch)
            except coredis.exceptions.NoScriptError:  # Redis lost its scripts: load, send again
                self._publish_sha = None
                continue
            except REDIS_ERRORS as exc:
                self._publish_sha = None
                if self.publisher_up:
                    log.warning("Redis unreachable: publishing paused", error=describe(exc))
                self.publisher_up = False
                self._fail_waiters(str(exc)[:200])
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            if not self.publisher_up:
                log.info("Redis reachable: publishing")
            self.publisher_up = True
            backoff = BACKOFF_S[0]
            for (_, waiter), at in zip(batch, results, strict=True):
                self._outbox.popleft()
                if waiter is not None:
                    waiter.positions.append(at)
                    if len(waiter.positions) == waiter.count:
                        waiter.done.set()
            self.published += len(batch)
            self._sent.set()
            self._sent = trio.Event()

    async def _send(self, batch: list[tuple[Outgoing, _Waiter | None]]) -> list[Position]:
        """One script call per run of messages on one channel, all in one round trip; a run
        goes out as one pub/sub message, so a burst reaches each client in one write."""
        runs = [list(run) for _, run in itertools.groupby(
            (item for item, _ in batch), key=lambda item: item.channel)]  # fmt: skip
        with trio.fail_after(self._config.timeout_s):
            if self._publish_sha is None:  # (again: a restarted Redis has no scripts)
                self._publish_sha = await self.client.script_load(_PUBLISH_LUA)
            # plain EVALSHA: a pipeline of Script objects asks SCRIPT EXISTS every round trip
            async with self.client.pipeline(transaction=False) as pipe:
                requests = [self._publish_request(pipe, run) for run in runs]
            positions = []
            for run, request in zip(runs, requests, strict=True):
                epoch, first = decode_published(await request)
                positions += [Position(epoch, first + i) for i in range(len(run))]
            return positions

    def _publish_request(self, pipe: Any, run: list[Outgoing]) -> Any:
        keys = Keys(self.prefix, run[0].channel)
        kind = state_kind(run[0].channel)
        size = {StateKind.EVENTS: self._history_size, StateKind.DIFF: DIFF_HISTORY}.get(kind, 0)
        args: list[Any] = [
            keys.pubsub, new_epoch(), size, self._history_age_ms, META_TTL_S,
            self._publish_command, "1" if kind is StateKind.WHOLE else "0", ARCHIVE_SIZE,
        ]  # fmt: skip
        for item in run:
            state = bytes(item.state) if item.state is not None else b""
            args += [bytes(item.data), state, "1" if item.archive else ""]
        keys_ = [keys.meta, keys.hist, keys.archive]
        return pipe.evalsha(self._publish_sha, keys=keys_, args=args)

    def _fail_waiters(self, error: str) -> None:
        """Confirmed publishes do not wait out an outage: they are told at once (HTTP 503),
        and their messages leave the outbox (the caller was told no). Others stay queued."""
        failed = {waiter for _, waiter in self._outbox if waiter is not None}
        if failed:
            self._outbox = deque(entry for entry in self._outbox if entry[1] is None)
            for waiter in failed:
                waiter.error = error
                waiter.done.set()

    async def _subscriber(self) -> None:
        backoff = Backoff(*BACKOFF_S)
        while True:
            error = "pub/sub session ended"
            try:
                await self._follow()
            except* REDIS_ERRORS as group:
                error = describe(group)
                if self.subscriber_up:
                    log.warning("Redis pub/sub lost: resubscribing", link="subscribe", error=error)
            if self.subscriber_up:  # a session that was up: the backoff starts again
                backoff.reset()
            self._mark(self._links["subscribe"], False, error)
            await trio.sleep(backoff.next())

    async def _follow(self) -> None:
        """One pub/sub session: a new connection (one per shard on a Cluster) subscribes
        what the hub wants and then follows the hub's changes, until it fails. Then the
        connection is discarded, so nothing it was subscribed to outlives the session."""
        cls = ShardedPubSub if self._cluster else PubSub
        timeout = self._config.timeout_s
        commands, to_send = trio.open_memory_channel[tuple[Action, str]](math.inf)
        async with cls(
            self._data_client.connection_pool, ignore_subscribe_messages=False,
            retry_policy=None, subscription_timeout=timeout, unsubscription_timeout=timeout,
        ) as ps:  # fmt: skip
            try:
                self._ps, self._commands = ps, commands
                rejoining = self._following.up()
                self._rejoining = set(rejoining)  # up (ready) once these are confirmed
                for channel, actions in rejoining.items():
                    self._act(channel, actions)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_commands, ps, to_send)
                    nursery.start_soon(self._watch, functools.partial(_pings, ps))
                    waiting = _pending_messages(ps)
                    self._on_pubsub_message(None)  # up at once if there is nothing to follow
                    while True:
                        self._on_pubsub_message(await ps.get_message())
                        # every message already received goes to the hub before the flusher
                        # runs, so a burst leaves in one write per connection, as in one process
                        for message in waiting():
                            self._on_pubsub_message(message)
            finally:
                self._ps = self._commands = None
                _discard(ps)
                for channel, actions in self._following.down().items():
                    self._act(channel, actions)
                self._changed_state()

    async def _send_commands(
        self, ps: Any, to_send: trio.MemoryReceiveChannel[tuple[Action, str]]
    ) -> None:
        """Send this session's SUBSCRIBEs and UNSUBSCRIBEs in order, those queued together in
        one command. One Redis does not confirm in time ends the session: its outcome is
        unknown, and only a new connection is known to carry nothing."""
        async for action, channel in to_send:
            batch = [(action, channel)]
            while True:
                try:
                    batch.append(to_send.receive_nowait())
                except trio.WouldBlock:
                    break
            for kind, group in itertools.groupby(batch, key=lambda item: item[0]):
                run = [channel for _, channel in group]
                keys = [Keys(self.prefix, c).pubsub for c in run]
                if kind is Action.SUBSCRIBE:
                    await ps.subscribe(*keys)  # raises TimeoutError if not confirmed
                else:  # (coredis only logs an UNSUBSCRIBE it has no confirmation of)
                    await ps.unsubscribe(*keys)
                    await self._confirmed(set(run))

    async def _confirmed(self, channels: set[str]) -> None:
        """Wait for Redis to confirm the UNSUBSCRIBE of ``channels``, or end the session."""
        leaving = (State.UNSUBSCRIBING, State.UNSUBSCRIBING_WANTED)
        with trio.move_on_after(self._config.timeout_s):
            while any(self._following.state(c) in leaving for c in channels):
                await self._acked.wait()
            return
        raise BusUnavailable("Redis did not confirm UNSUBSCRIBE in time")

    def _act(self, channel: str, actions: list[Action]) -> None:
        """Do what the follow machine says, for ``channel``."""
        for action in actions:
            feed = self._feeds.get(channel)
            if action is Action.SUBSCRIBE or action is Action.UNSUBSCRIBE:
                assert self._commands is not None, "a command with no pub/sub link"
                self._commands.send_nowait((action, channel))
            elif action is Action.READY and feed is not None:
                feed.subscribed.set()
                if feed.position is not None and feed.held is None:
                    self._start_catch_up(channel, feed)  # what was published while away
            elif action is Action.UNREADY and feed is not None:
                feed.subscribed = trio.Event()

    def _changed_state(self) -> None:
        self._acked.set()
        self._acked = trio.Event()

    def _on_pubsub_message(self, message: Any) -> None:
        if message is not None:
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._on_pubsub(message["channel"], message["data"])
                return
            channel = self._channel_of(message["channel"])
            if channel is not None and kind in ("subscribe", "ssubscribe"):
                self._rejoining.discard(channel)
                self._act(channel, self._following.subscribed(channel))
            elif channel is not None and kind in ("unsubscribe", "sunsubscribe"):
                self._act(channel, self._following.unsubscribed(channel))
            self._changed_state()
        if not self.subscriber_up and not self._rejoining and self._following.link_up:
            log.info("Redis pub/sub following", channels=len(self._following.following()))
            self.subscriber_up = True

    def _channel_of(self, pubsub_channel: bytes) -> str | None:
        """The channel a pub/sub name (``<prefix>:{<channel>}``) is of; None if not ours."""
        head = self._pubsub_head
        if pubsub_channel.startswith(head) and pubsub_channel.endswith(b"}"):
            return pubsub_channel[len(head) : -1].decode(errors="replace")
        return None

    def _on_pubsub(self, pubsub_channel: bytes, payload: bytes) -> None:
        channel = self._channel_of(pubsub_channel)
        if channel is None or self._following.state(channel) is not State.FOLLOWING:
            return  # Redis delivers what it was asked to until it confirms an UNSUBSCRIBE
        try:
            epoch, first, messages = _message.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            log.warning("undecodable bus message", channel=channel)
            return
        for seq, data in enumerate(messages, first):
            self._on_message(channel, epoch, seq, data)

    def _on_message(self, channel: str, epoch: str, seq: int, data: msgspec.Raw) -> None:
        feed = self._feeds.get(channel)
        if feed is None:
            return
        if feed.held is not None:
            if len(feed.held) >= MAX_HELD:  # the oldest go: a gap the replay of the rest finds
                del feed.held[: MAX_HELD // 2]
                self.gaps += 1
            feed.held.append((epoch, seq, data))
            return
        last = feed.position
        if last is not None and epoch == last.epoch:
            if seq <= last.seq:
                self.duplicates += 1
                return
            if seq > last.seq + 1:
                self.gaps += 1
                feed.held = [(epoch, seq, data)]
                self._start_catch_up(channel, feed)
                return
        self._deliver(channel, feed, epoch, seq, data)

    def _deliver(self, channel: str, feed: _Feed, epoch: str, seq: int, data: msgspec.Raw) -> None:
        """Hand one message to the hub, which drops what no client can be sent (data that
        is not UTF-8: anyone with access to Redis can publish) with a resync notice."""
        feed.position = Position(epoch, seq)
        hub = self._hub
        undeliverable = hub.undeliverable
        hub.publish(channel, epoch, seq, data)
        if hub.undeliverable != undeliverable:
            self.malformed += 1
            self._malformed_log.warning(channel=channel, seq=seq, malformed=self.malformed)
        elif feed.kind is StateKind.WHOLE:
            self._whole[channel] = (feed.position, data)
        elif feed.kind is StateKind.DIFF and hub.wants_state(channel):
            self.want_state(channel)  # this message may be the one that stored a state

    def want_state(self, channel: str) -> None:
        """A join to a diff stream waits for the stream's state (the hub asks its upstream,
        ``RedisBackplane.want_state``, and each live message while one waits): read the stored
        state and the diffs after it and offer them to the hub. One read per channel at a
        time; a message that arrives during it makes it read again if it found none."""
        feed = self._feeds.get(channel)
        if feed is None or self._nursery is None:
            return
        if feed.reading_state:
            feed.state_again = True
            return
        feed.reading_state = True
        self._nursery.start_soon(self._read_state, channel, feed)

    async def _read_state(self, channel: str, feed: _Feed) -> None:
        try:
            while self._feeds.get(channel) is feed and self._hub.wants_state(channel):
                feed.state_again = False
                try:
                    recovery = await self._read(feed, None, want_state=True)
                except BusUnavailable:  # the next live message (Redis back) asks again
                    return
                if self._feeds.get(channel) is not feed:
                    return
                self._hub.offer_state(channel, recovery)
                if not feed.state_again:
                    return
        finally:
            feed.reading_state = False

    def _keep_whole(self, channel: str, epoch: str, state: Entry) -> None:
        known = self._whole.get(channel)
        if known is None or known[0].epoch != epoch or known[0].seq < state.seq:
            self._whole[channel] = (Position(epoch, state.seq), state.data)

    def _start_catch_up(self, channel: str, feed: _Feed) -> None:
        if feed.held is None:
            feed.held = []
        assert self._nursery is not None
        self._nursery.start_soon(self._catch_up, channel, feed)

    async def _catch_up(self, channel: str, feed: _Feed) -> None:
        """Fill a gap in this node's stream of ``channel`` from history, or tell subscribers.
        The channel's messages are held meanwhile; a read that fails (Redis still coming back)
        is tried again with a backoff, since nothing else would release them."""
        since = feed.position
        backoff = Backoff(*BACKOFF_S)
        while True:
            try:
                recovery = await self._read(feed, since, want_state=feed.kind is StateKind.WHOLE)
                break
            except BusUnavailable:
                if self._feeds.get(channel) is not feed:
                    return
                await trio.sleep(backoff.next())
        if self._feeds.get(channel) is not feed:
            return
        held, feed.held = feed.held or [], None
        try:  # what Redis handed back is not trusted: at worst the channel's subscribers are told
            if recovery.recovered:
                self.recovered_gaps += 1
                for entry in recovery.missed:
                    self._deliver(channel, feed, recovery.position.epoch, entry.seq, entry.data)
            else:
                self.resyncs += 1
                self._gap_log.warning(channel=channel, since=since.seq if since else None)
                if feed.kind is StateKind.WHOLE and recovery.current:
                    self._keep_whole(channel, recovery.position.epoch, recovery.current[-1])
                feed.position = recovery.position
                self._hub.resync(channel, recovery.position)
            for epoch, seq, data in held:
                self._on_message(channel, epoch, seq, data)
        except Exception:
            log.exception("catch-up failed: subscribers told", channel=channel)
            feed.held = None
            self._hub.resync(channel, feed.position or recovery.position)

    async def _read(self, feed: _Feed, since: Position | None, *, want_state: bool) -> Recovery:
        """What ``feed`` had after ``since``; a reply that is not the script's is a resync at
        what the node knows (the scripts check what they read, so only a broken Redis sends
        one)."""
        try:
            reply = await self._recover_reply(
                feed.keys, since, want_state=want_state, most=MAX_REPLAY
            )
        except MalformedData as exc:
            self._on_malformed_reply(feed.keys.pubsub, exc)
            return Recovery(feed.position or since or Position("", 0), recovered=False)
        return recovery_from(since, reply)

    def _on_malformed_reply(self, channel: str, exc: MalformedData) -> None:
        self.malformed += 1
        self._malformed_log.warning(channel=channel, error=str(exc)[:200])

    async def _recover_reply(
        self, keys: Keys, since: Position | None, *, want_state: bool, most: int
    ) -> Recovered:
        args = [
            str(since.seq) if since is not None else "", since.epoch if since is not None else "",
            new_epoch(), "1" if want_state else "0", META_TTL_S, most,
        ]  # fmt: skip
        try:
            with trio.fail_after(self._config.timeout_s):
                keys_ = [keys.meta, keys.hist]
                reply = await self._recover_script(keys=keys_, args=args)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        return decode_recovered(reply)
