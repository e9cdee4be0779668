"""The Redis bus's follower: the channels this node's hub wants, from Redis, whole.

Subscribing
    A node SUBSCRIBEs to a channel when its hub gets the channel's first subscriber and
    UNSUBSCRIBEs when the last leaves, each channel through one explicit state
    (``follow.py``): a subscribe during an unsubscribe waits for it, and messages reach the
    hub only for channels Redis confirmed and the hub wants. Pub/sub has connections of its
    own, named ``<name>:data`` (``CLIENT LIST``), never lent to commands; one that ends is
    discarded with every subscription on it, and the next one subscribes exactly what the hub
    wants. Every connection is PINGed by pushd itself (``link.py``): one silent for
    ``timeout_s`` is dead, the node not ready, and it is replaced the same way. A joining
    client is kept *pending* by the hub while this follower asks Redis (``lua/recover.lua``,
    after the SUBSCRIBE is confirmed) for what it missed or for the stream's state; the hub
    merges the answer with the live events by seq.

Keeping the node's stream whole
    Each channel's last delivered position is tracked here. A message whose seq jumps past it
    (Redis pub/sub is at-most-once: a reconnect loses what was published meanwhile) holds the
    channel while the gap is read from history; if history no longer has it, the hub tells the
    channel's subscribers (current state or a resync notice). After a reconnect every channel
    is checked the same way, so an outage costs clients a replay, or at worst a notice, never
    a silent hole.

State streams on nodes without the book
    The publisher stores each stream's state in the meta hash (``publisher.py``); a join to a
    diff stream with no state here waits, and the follower reads the stored state and the
    diffs after it for it (``want_state``). A whole-state stream's last state is kept here
    (``current``), for the hub's first event.

Over 400 lines: one pub/sub session, the per-channel feeds it fills and the catch-ups that
keep them whole share the feeds' state and its invariants (a held channel, a position), so
they stay in one class. ``hash_slot`` is coredis's private helper (``carriers``, a
diagnostic); its import fails loudly if coredis moves it.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import msgspec
import structlog
import trio
from coredis._utils import hash_slot
from coredis.patterns.pubsub import PubSub

from pushd.backoff import Backoff
from pushd.bus.follow import Action, Following, State
from pushd.bus.link import (
    BACKOFF_S,
    REDIS_ERRORS,
    Links,
    ShardedPubSub,
    describe,
    discard,
    pending_messages,
    pings,
    watch,
)
from pushd.bus.model import Delivery, Entry, Position, Recovery
from pushd.bus.store import MAX_REPLAY, Keys, Store, recovery_from
from pushd.channels import StateKind, state_kind
from pushd.config import BusConfig
from pushd.errors import BusUnavailable, MalformedData
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.redis")

MAX_HELD = 10_000  # live messages of one channel held while a gap is read; past it, a resync

_message = msgspec.json.Decoder(tuple[str, int, list[msgspec.Raw]])  # epoch, first seq, data


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


class Follower:
    def __init__(
        self, hub: Delivery, links: Links, store: Store, config: BusConfig, name: str
    ) -> None:
        self._hub = hub
        self._links = links
        self._store = store
        self._config = config.redis
        self._cluster = config.redis.cluster
        self.prefix = config.redis.prefix
        self.data_name = name  # its connections' name in CLIENT LIST
        self._pubsub_head = f"{self.prefix}:{{".encode()  # what every pub/sub name starts with
        self._feeds: dict[str, _Feed] = {}
        self._whole: dict[str, tuple[Position, msgspec.Raw]] = {}  # WHOLE streams' last state
        self._following = Following()  # each channel's state in Redis (follow.py)
        self._commands: trio.MemorySendChannel[tuple[Action, str]] | None = None  # this link's
        self._acked = trio.Event()  # set (and replaced) when a channel's state changed
        self._ps: Any = None  # the pub/sub session now, to say which connection carries what
        self._rejoining: set[str] = set()  # subscribed again by this session, not confirmed yet
        self._nursery: trio.Nursery | None = None
        self._client: Any = None  # pub/sub of the channels only
        self.recovered_gaps = 0
        self.resyncs = 0  # gaps history could not fill: subscribers told
        self._gap_log = ThrottledLog(log, "channel gap not in history: subscribers told")
        # (anyone with access to Redis can publish on a channel: no line each)
        self._undecodable_log = ThrottledLog(log, "undecodable bus message")

    @property
    def up(self) -> bool:
        """Whether the pub/sub link is up and carries what the hub wanted when it came up."""
        return self._links.link("subscribe").up

    @up.setter
    def up(self, up: bool) -> None:
        self._links.mark("subscribe", up)

    async def run(
        self, client: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow through ``client`` (pub/sub only) until cancelled, a session after another;
        Redis being unreachable is a state (``up``), not an error."""
        self._client = client
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._subscriber()

    def position(self, channel: str) -> Position | None:
        feed = self._feeds.get(channel)
        return feed.position if feed is not None else None

    def current(self, channel: str) -> tuple[Position, msgspec.Raw] | None:
        """The last state of a whole-state stream this node follows (the hub's hook)."""
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
                layout = self._client.connection_pool.cluster_layout
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

    async def _subscriber(self) -> None:
        backoff = Backoff(*BACKOFF_S)
        while True:
            error = "pub/sub session ended"
            try:
                await self._follow()
            except* REDIS_ERRORS as group:
                error = describe(group)
                if self.up:
                    log.warning("Redis pub/sub lost: resubscribing", link="subscribe", error=error)
            if self.up:  # a session that was up: the backoff starts again
                backoff.reset()
            self._links.mark("subscribe", False, error)
            await trio.sleep(backoff.next())

    async def _follow(self) -> None:
        """One pub/sub session: a new connection (one per shard on a Cluster) subscribes
        what the hub wants and then follows the hub's changes, until it fails. Then the
        connection is discarded, so nothing it was subscribed to outlives the session."""
        cls = ShardedPubSub if self._cluster else PubSub
        timeout = self._config.timeout_s
        commands, to_send = trio.open_memory_channel[tuple[Action, str]](math.inf)
        async with cls(
            self._client.connection_pool, ignore_subscribe_messages=False,
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
                    nursery.start_soon(
                        watch, functools.partial(pings, ps),
                        self._config.probe_interval_s, self._config.timeout_s,
                    )  # fmt: skip
                    waiting = pending_messages(ps)
                    self._on_pubsub_message(None)  # up at once if there is nothing to follow
                    while True:
                        self._on_pubsub_message(await ps.get_message())
                        # every message already received goes to the hub before the flusher
                        # runs, so a burst leaves in one write per connection, as in one process
                        for message in waiting():
                            self._on_pubsub_message(message)
            finally:
                self._ps = self._commands = None
                discard(ps)
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
        if not self.up and not self._rejoining and self._following.link_up:
            log.info("Redis pub/sub following", channels=len(self._following.following()))
            self.up = True

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
            self._undecodable_log.warning(channel=channel, size=len(payload))
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
            feed.held.append((epoch, seq, data))
            return
        last = feed.position
        if last is not None and epoch == last.epoch:
            if seq <= last.seq:  # a duplicate
                return
            if seq > last.seq + 1:
                feed.held = [(epoch, seq, data)]
                self._start_catch_up(channel, feed)
                return
        self._deliver(channel, feed, epoch, seq, data)

    def _deliver(self, channel: str, feed: _Feed, epoch: str, seq: int, data: msgspec.Raw) -> None:
        """Hand one message to the hub, which drops what no client can be sent (data that
        is not UTF-8: anyone with access to Redis can publish) with a resync notice."""
        feed.position = Position(epoch, seq)
        hub = self._hub
        if hub.publish(channel, epoch, seq, data) is None:
            self._store.saw_malformed(channel=channel, seq=seq)
        elif feed.kind is StateKind.WHOLE:
            self._whole[channel] = (feed.position, data)
        elif feed.kind is StateKind.DIFF and hub.wants_state(channel):
            self.want_state(channel)  # this message may be the one that stored a state

    def want_state(self, channel: str) -> None:
        """A join to a diff stream waits for the stream's state (the upstream's ``want_state``,
        and each live message while one waits): read the stored state and the diffs after it
        and offer them to the hub. One read per channel at a time; a message that arrives
        during it makes it read again if it found none."""
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
            reply = await self._store.recover(
                feed.keys, since, want_state=want_state, most=MAX_REPLAY
            )
        except MalformedData as exc:
            self._store.saw_malformed(channel=feed.keys.pubsub, error=str(exc)[:200])
            return Recovery(feed.position or since or Position("", 0), recovered=False)
        return recovery_from(since, reply)
