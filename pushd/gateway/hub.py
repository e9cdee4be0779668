"""Channels to subscribers, and the fan-out hot path. No I/O.

Theory of operation
-------------------
A message reaching this node is encoded to JSON once and framed as a WebSocket text frame once;
the same ``bytes`` are appended to the outbound buffer (``Outlet.out``) of every subscriber. An
outlet whose buffer went from empty to non-empty joins ``dirty``; the gateway's flusher takes the
dirty list after the publishing task yields and writes each buffer to its socket with one
``send`` -- so every frame published in one scheduler tick reaches a connection in one syscall.

Buffers are bounded in bytes (``Outlet.limit``). When a frame does not fit:

- public market stream: the frame is dropped for that subscriber and the channel is marked
  *lagging*; further frames of that channel are dropped too until the buffer has drained, then
  the subscriber gets one ``{"event":...,"resync":true,"seq":N,...}`` (N = last seq it lost) and
  the stream goes on. A slow reader never costs anyone else anything.
- private stream, or a reply: the outlet is marked ``slow``; the gateway closes it with
  ``CloseCode.SLOW_CONSUMER`` so the client reconnects and reloads its private state. Private
  events are never silently skipped.

A subscriber joins in two steps when what it gets first needs a look at the bus (a replay of
what it missed, or on a node without the book the stream's current state): ``join`` adds it as
*pending*, so the channel's live events are kept for it; ``settle`` then sends what the bus
answered and, after it, the kept events it does not have yet (by seq), and makes it live. No
event is lost or doubled between the replay and the live stream.

A depth subscriber starts from the whole book (docs/streams.md): a join to a diff stream that
neither the bus's answer nor the upstream's ``current`` gives a state *waits* (``wants_state``)
with its live events kept, and the upstream is asked for one (``want_state``); the first state
that arrives (``offer_state`` from a bus that stores them, or ``current`` once it has one)
settles it, and the diffs before that state are never sent. So the rule holds whatever the
publisher did (a channel's new epoch that began with diffs, after Redis came back empty), on
every bus.

A replay may be larger than the outbound buffer (a ``since`` of a busy trades stream): it is
*paced*. ``settle`` queues what fits in half the buffer (the other half stays free for
replies, current states and the other channels' events); the rest of the replay, and the live
events kept after it, wait in the joining state and go out in order as the buffer drains
(``drained``), and the subscriber goes live when nothing is left. A replay never overflows
the buffer, so recovery always finishes; only a single event larger than the whole buffer
cannot be paced, and ``unpaceable`` says so before the reply (``recovered: false``).

A second dialect (the Binance surface, ``pushd.binance``) joins a channel through a *view*
(``join_view``): a key and an encoder that turns one of the channel's events into that
dialect's whole frames. A route calls each view's encoder once per event, when the view has
subscribers, and appends the same bytes to each of them: encoded once per view, framed once per
node. A view subscriber gets live events only (no state first, no replay, no resync notice: the
dialect numbers its own updates, so a loss is a visible break); one whose buffer overflows is
closed like a slow private reader. A dialect may also *tap* a channel (``tap``): told each
event, no subscriber, the channel followed for it; what it makes of them it queues itself
(``deliver``, the same rules as a view's frames): the Binance all-market arrays, sent once a
second for every symbol.

The hub owns the dirty list (``take_dirty``) and every write into an outlet: events, replies
(``send``), the reply to a subscribe before the streams' first events (``settle_with_reply``),
and a connection's close frame in place of its backlog (``close_with``). The writer only takes
bytes from an outlet's front.

(Over 400 lines: the fan-out, the two-step join with paced replays, and the lag policy share
one routing table and its invariants; split apart, each part would reach into the others'
state.)
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import msgspec
from wsproto.frame_protocol import FrameProtocol

from pushd.bus.model import Entry, Position, Recovery, Snapshot, Upstream
from pushd.channels import Channel, StateKind, state_kind
from pushd.gateway.protocol import encode_current_after_lag, encode_event, encode_resync

_server_framer = FrameProtocol(client=False, extensions=[])


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame (server to client, no extensions)."""
    return bytes(_server_framer.send_data(payload.decode("utf-8")))


def frame_end(buf: bytes | bytearray, start: int, upto: int) -> int:
    """The first frame boundary at or after ``upto`` in a buffer of whole server frames,
    walking the frame headers from ``start`` (a boundary). Used after a partial ``send`` to
    know where the frame that went out in part ends: only whole frames may be dropped."""
    pos = start
    while pos < upto:
        length = buf[pos + 1] & 0x7F
        if length == 126:
            pos += 4 + int.from_bytes(buf[pos + 2 : pos + 4], "big")
        elif length == 127:
            pos += 10 + int.from_bytes(buf[pos + 2 : pos + 10], "big")
        else:
            pos += 2 + length
    return pos


class Outlet:
    """What the hub sees of a connection: its outbound bytes and its overflow state. A
    connection has one (``owner``: the connection, for whoever takes the dirty list).

    Frames are written into ``out`` by the hub only; the writer takes bytes from its front.
    ``out`` always holds whole frames, except that its first ``head_left`` bytes are the rest
    of a frame that a partial ``send`` began (the writer keeps this up to date).
    """

    __slots__ = ("head_left", "lagging", "limit", "out", "owner", "replaying", "slow")

    def __init__(self, limit: int, owner: Any = None) -> None:
        self.owner = owner
        self.out = bytearray()
        self.head_left = 0
        self.limit = limit
        # internal -> (channel, last lost position)
        self.lagging: dict[str, tuple[Channel, Position]] = {}
        # channels whose replay is being paced into the buffer: internal -> channel
        self.replaying: dict[str, Channel] = {}
        self.slow = False

    @property
    def behind(self) -> bool:
        """The hub wants to hear when the buffer has drained (``Hub.drained``): a lagging
        channel resumes, or a paced replay goes on."""
        return bool(self.lagging or self.replaying)


MAX_PENDING = 10_000  # live events kept for one joining subscriber; more marks it slow
FRAME_OVERHEAD = 96  # an event's envelope and frame header beyond its data and channel name

# a kept live event: (epoch, seq, data); data None marks a resync notice at that seq (events
# up to it may have been lost before they reached this node)
_Kept = tuple[str, int, msgspec.Raw | None]


class _Joining:
    """A subscriber on its way in: the live events kept for it and, once settled, what is left
    of its replay (paced into its buffer as it drains)."""

    __slots__ = ("epoch", "kept", "last", "replay", "settled", "waiting")

    def __init__(self) -> None:
        self.kept: deque[_Kept] = deque()
        self.replay: deque[Entry] = deque()
        self.epoch = ""  # the replay's epoch
        self.last: Position | None = None  # the last event queued to the subscriber
        self.settled = False
        self.waiting = False  # a diff stream's join with no state yet (``Hub.wants_state``)


# a view's encoder: one event (epoch, seq, data) as that dialect's whole frames (b"": none)
ViewEncoder = Callable[[str, int, msgspec.Raw], bytes]
# a tap: told each event (epoch, seq, data) of a channel, sends nothing itself
Tap = Callable[[str, int, msgspec.Raw], None]


@runtime_checkable
class StatefulView(Protocol):
    """A view encoder that reads a diff stream's state (a book) and may have none: the hub
    asks the bus for one (``on_wants_state``) and hands it over (``offer_state``)."""

    @property
    def wants_state(self) -> bool: ...

    def offer_state(self, recovery: Recovery) -> None: ...


class _View:
    """Another dialect's subscribers of a channel, and how it frames the channel's events."""

    __slots__ = ("encode", "stateful", "subscribers")

    def __init__(self, encode: ViewEncoder) -> None:
        self.encode = encode
        candidate: object = encode  # (a Callable's narrowing to the Protocol is lost on mypy:
        # typed ``object``, the branches that read ``stateful`` stay type-checked)
        self.stateful: StatefulView | None = (
            candidate if isinstance(candidate, StatefulView) else None
        )
        self.subscribers: dict[Outlet, None] = {}


class _Route:
    __slots__ = (
        "ahead", "began", "channel", "epoch", "pending", "seq", "subscribers", "taps", "views",
    )  # fmt: skip

    def __init__(self, channel: Channel, began: float) -> None:
        self.channel = channel
        self.began = began  # (wall clock) when this node began to follow the channel
        self.subscribers: dict[Outlet, None] = {}  # an ordered set
        # joining subscribers -> the live events kept for them and what is left of the replay
        self.pending: dict[Outlet, _Joining] = {}
        # settled subscribers whose replay went past the last event this node delivered (the
        # bus answered before its own stream caught up) -> that seq: they go live after it
        self.ahead: dict[Outlet, Position] = {}
        self.epoch = ""
        self.seq = 0
        self.views: dict[Hashable, _View] = {}  # another dialect's subscribers, by view key
        self.taps: dict[Hashable, Tap] = {}  # another dialect's listeners, by key


class HubStats(msgspec.Struct):
    channels: int
    subscriptions: int
    published: int
    delivered: int
    dropped: int
    replies: int  # frames queued to one outlet: replies, pongs, resync notices, states
    lag_resyncs: int  # lagging subscribers that resumed with a state or a resync notice
    by_stream: dict[str, int]  # subscriptions by stream ("depth", "trades", "kline_1m", ...)


def stream_of(protocol_name: str) -> str:
    """The stream kind of a protocol channel name: what follows the ``@``."""
    return protocol_name.rpartition("@")[2]


class Detached:
    """The upstream of a hub no bus side is attached to (sans-IO tests): it follows nothing,
    holds no state and knows no position."""

    def interest(self, channel: str) -> None:
        pass

    def disinterest(self, channel: str) -> None:
        pass

    def want_state(self, channel: str) -> None:
        pass

    def position(self, channel: str) -> Position | None:
        return None

    def current(self, channel: str) -> Snapshot | None:
        return None


class Hub:
    def __init__(
        self, upstream: Upstream | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock  # wall clock: a private gap's time comes from another node
        self._routes: dict[str, _Route] = {}
        self.dirty: list[Outlet] = []
        self.on_dirty: Callable[[], None] = lambda: None  # the dirty list became non-empty
        # the bus side: which channels this node follows, states and positions (the one
        # source of a stream's current state: ``pushd.bus.backplane``)
        self._upstream: Upstream = upstream if upstream is not None else Detached()
        self._current_frames: dict[str, tuple[Snapshot, bytes]] = {}
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.replies = 0
        self.lag_resyncs = 0
        self.undeliverable = 0  # messages whose data could not be framed (not UTF-8)

    def attach(self, upstream: Upstream) -> None:
        """The node's bus side, once it is built: the one cycle of the composition root (a bus
        delivers to the hub it is given, and the hub tells that bus side what it follows), so
        it is closed once, here, before anything subscribes."""
        assert not self._routes, "attached after subscribers came"
        self._upstream = upstream

    def position(self, internal: str) -> Position | None:
        """Where ``internal`` stands as this node knows it now."""
        return self._upstream.position(internal)

    def current(self, internal: str) -> Snapshot | None:
        """``internal``'s state as this node holds it now (a view that reads a book seeds
        from it)."""
        return self._upstream.current(internal)

    def subscribe(self, outlet: Outlet, channel: Channel) -> Position | None:
        """Add a live subscriber; it gets the stream's current state first, where there is one.
        Returns where its stream starts."""
        self.join(outlet, channel)
        return self.settle(outlet, channel, None)

    def join(self, outlet: Outlet, channel: Channel) -> None:
        """Add a pending subscriber: live events are kept for it until ``settle``."""
        self._route(channel).pending[outlet] = _Joining()

    def _route(self, channel: Channel) -> _Route:
        route = self._routes.get(channel.internal)
        if route is None:
            route = self._routes[channel.internal] = _Route(channel, self._clock())
            self._upstream.interest(channel.internal)
        return route

    def join_view(
        self, outlet: Outlet, channel: Channel, key: Hashable, encoder: Callable[[], ViewEncoder]
    ) -> None:
        """Add a live subscriber of another dialect's view ``key`` of ``channel`` (its encoder
        made by ``encoder()`` when the view is new on this node)."""
        route = self._route(channel)
        view = route.views.get(key)
        if view is None:
            view = route.views[key] = _View(encoder())
        view.subscribers[outlet] = None

    def tap(self, channel: Channel, key: Hashable, listener: Tap) -> None:
        """Tell ``listener`` each event of ``channel`` until ``untap``: the channel is followed
        for it, but it is no subscriber (the Binance all-market streams keep each symbol's
        latest data this way and send it on a timer: ``Hub.deliver``)."""
        self._route(channel).taps[key] = listener

    def untap(self, internal: str, key: Hashable) -> None:
        route = self._routes.get(internal)
        if route is not None and route.taps.pop(key, None) is not None:
            self._forget_if_idle(route)

    def leave_view(self, outlet: Outlet, internal: str, key: Hashable) -> None:
        route = self._routes.get(internal)
        view = route.views.get(key) if route is not None else None
        if route is None or view is None:
            return
        view.subscribers.pop(outlet, None)
        if not view.subscribers:
            del route.views[key]
            self._forget_if_idle(route)

    def settle(
        self, outlet: Outlet, channel: Channel, recovery: Recovery | None
    ) -> Position | None:
        """Make a pending subscriber live: first what it missed (``recovery.recovered``) or
        else the stream's current state, then the kept events it does not have. What does not
        fit the buffer now follows as it drains (see the module's docstring). Returns where
        its stream starts (None: unknown, or it left while pending)."""
        route = self._routes.get(channel.internal)
        joining = route.pending.get(outlet) if route is not None else None
        if route is None or joining is None or joining.settled:
            return None
        joining.settled = True
        start: Position | None
        if recovery is not None and recovery.recovered:
            start = recovery.position
            joining.replay.extend(recovery.missed)
        elif recovery is not None and recovery.current:
            start = Position(recovery.position.epoch, recovery.current[-1].seq)
            joining.replay.extend(recovery.current)
        else:
            start = self._send_current(outlet, channel)
            if start is None and state_kind(channel.internal) is StateKind.DIFF:
                return self._wait_for_state(outlet, channel, joining, recovery)
            if start is None and recovery is not None:
                start = recovery.position
            elif start is None:
                start = self.position(channel.internal)
        if start is not None:
            joining.epoch = start.epoch
            joining.last = (
                Position(start.epoch, joining.replay[0].seq - 1) if joining.replay else start
            )
        self._feed(route, outlet, joining)
        return start

    def _wait_for_state(
        self, outlet: Outlet, channel: Channel, joining: _Joining, recovery: Recovery | None
    ) -> Position | None:
        """A diff stream's join with no state to start from stays pending (its live events
        kept) until ``offer_state`` or ``current`` gives one: no diff goes out before it."""
        joining.settled = False
        joining.waiting = True
        self._upstream.want_state(channel.internal)
        return recovery.position if recovery is not None else self.position(channel.internal)

    def wants_state(self, internal: str) -> bool:
        """Whether a join to ``internal`` waits for the stream's state, or a view that reads
        it (a book) has none (see ``offer_state``)."""
        route = self._routes.get(internal)
        return route is not None and (
            any(j.waiting for j in route.pending.values())
            or any(
                s is not None and s.wants_state for s in (v.stateful for v in route.views.values())
            )
        )

    def offer_state(self, internal: str, recovery: Recovery) -> int:
        """A stream's state and the diffs after it (``recovery.current``, as a bus that stores
        states reads them): every join waiting for a state starts from it, then the kept
        events after it; those before it are dropped. Returns how many started."""
        route = self._routes.get(internal)
        if route is None or not recovery.current:
            return 0
        epoch, state_seq = recovery.position.epoch, recovery.current[0].seq
        started = 0
        for outlet, joining in list(route.pending.items()):
            if joining.waiting:
                joining.waiting = False
                joining.kept = deque(k for k in joining.kept if k[0] == epoch and k[1] > state_seq)
                self.settle(outlet, route.channel, recovery)
                started += 1
        for view in route.views.values():
            if view.stateful is not None and view.stateful.wants_state:
                view.stateful.offer_state(recovery)
        return started

    def unpaceable(self, outlet: Outlet, channel: Channel, recovery: Recovery) -> str | None:
        """Why a replay cannot be paced into this outlet's buffer (one of its events is larger
        than the whole buffer), or None: every other replay can, however long."""
        room = outlet.limit - FRAME_OVERHEAD - len(channel.protocol)
        if any(len(entry.data) > room for entry in recovery.missed):
            return "size"
        return None

    def _feed(self, route: _Route, outlet: Outlet, joining: _Joining) -> None:
        """Queue what fits of a settled subscriber's replay, then of its kept events (those it
        does not have yet, by seq); when nothing is left it goes live."""
        protocol = route.channel.protocol
        internal = route.channel.internal
        out = outlet.out
        fill = outlet.limit // 2  # the other half: replies, states, other channels' events
        while joining.replay and not outlet.slow:
            entry = joining.replay[0]
            frame = text_frame(encode_event(protocol, entry.data, entry.seq, joining.epoch))
            if out and len(out) + len(frame) > fill:
                outlet.replaying[internal] = route.channel  # the rest when it has drained
                return
            joining.replay.popleft()
            self.send(outlet, frame)
            joining.last = Position(joining.epoch, entry.seq)
        kept = joining.kept
        while kept and not outlet.slow:
            epoch, seq, data = kept[0]
            last = joining.last
            if data is None:
                frame = text_frame(encode_resync(protocol, seq, epoch))
            elif last is None or epoch != last.epoch or seq > last.seq:
                frame = text_frame(encode_event(protocol, data, seq, epoch))
            else:  # the replay had it
                kept.popleft()
                continue
            if out and len(out) + len(frame) > fill:
                outlet.replaying[internal] = route.channel
                return
            kept.popleft()
            self.send(outlet, frame)
            if data is not None:
                joining.last = Position(epoch, seq)
        outlet.replaying.pop(internal, None)
        del route.pending[outlet]
        last = joining.last
        if last is not None and route.epoch in ("", last.epoch) and route.seq < last.seq:
            route.ahead[outlet] = last  # the replay is ahead of this node's stream
        else:
            route.subscribers[outlet] = None

    def _send_current(
        self, outlet: Outlet, channel: Channel, *, after_lag: bool = False
    ) -> Position | None:
        current = self._upstream.current(channel.internal)
        if current is None or current.data is None:
            return None
        at, data = current.position, current.data
        if after_lag:  # rare, and marked so the client knows it replaces what it had
            frame = encode_current_after_lag(channel.protocol, data, at.seq, at.epoch)
            self.send(outlet, text_frame(frame))
            return at
        framed = self._current_frames.get(channel.internal)
        if framed is None or framed[0].position != at or framed[0].data is not data:  # once
            frame = text_frame(encode_event(channel.protocol, data, at.seq, at.epoch))
            framed = (current, frame)
            self._current_frames[channel.internal] = framed
        self.send(outlet, framed[1])
        return at

    def unsubscribe(self, outlet: Outlet, internal: str) -> None:
        route = self._routes.get(internal)
        if route is None:
            return
        route.subscribers.pop(outlet, None)
        route.pending.pop(outlet, None)
        route.ahead.pop(outlet, None)
        outlet.lagging.pop(internal, None)
        outlet.replaying.pop(internal, None)
        self._forget_if_idle(route)

    def _forget_if_idle(self, route: _Route) -> None:
        if not (route.subscribers or route.pending or route.ahead or route.views or route.taps):
            internal = route.channel.internal
            del self._routes[internal]
            self._current_frames.pop(internal, None)
            self._upstream.disinterest(internal)

    def subscriber_count(self, internal: str) -> int:
        route = self._routes.get(internal)
        if route is None:
            return 0
        return len(route.subscribers) + len(route.pending) + len(route.ahead) + _viewers(route)

    def channels(self) -> Iterator[str]:
        return iter(self._routes)

    def stats(self) -> HubStats:
        by_stream: dict[str, int] = {}
        for r in self._routes.values():
            stream = stream_of(r.channel.protocol)
            by_stream[stream] = (
                by_stream.get(stream, 0) + len(r.subscribers) + len(r.pending) + len(r.ahead)
                + _viewers(r)
            )  # fmt: skip
        return HubStats(
            channels=len(self._routes),
            subscriptions=sum(by_stream.values()),
            published=self.published,
            delivered=self.delivered,
            dropped=self.dropped,
            replies=self.replies,
            lag_resyncs=self.lag_resyncs,
            by_stream=by_stream,
        )

    def publish(self, internal: str, epoch: str, seq: int, data: msgspec.Raw) -> int | None:
        """Deliver one event to every local subscriber of ``internal``; returns how many got it
        (None: its data is not UTF-8, dropped and its subscribers told: ``Delivery``)."""
        self.published += 1
        route = self._routes.get(internal)
        if route is None:
            return 0
        route.epoch = epoch
        route.seq = seq
        if not (route.subscribers or route.pending or route.ahead):
            # only another dialect's views follow it: pushd's own frame would go to nobody,
            # but its data is checked as that frame's encoding checks it (``Delivery``)
            try:
                codecs.utf_8_decode(data, "strict", True)
            except UnicodeDecodeError:
                self.undeliverable += 1
                return None
            was_clean = not self.dirty
            self._publish_views(route, epoch, seq, data)
            if was_clean and self.dirty:
                self.on_dirty()
            return 0
        try:
            frame = text_frame(encode_event(route.channel.protocol, data, seq, epoch))
        except UnicodeDecodeError:  # data not UTF-8: the bus should have refused it
            self._undeliverable(route, Position(epoch, seq))
            return None
        if route.pending:
            self._keep(route, epoch, seq, data)
        if route.ahead:
            self._catch_up(route, epoch, seq)
        size = len(frame)
        dirty = self.dirty
        was_clean = not dirty
        delivered = 0
        for outlet in route.subscribers:
            out = outlet.out
            if outlet.lagging and internal in outlet.lagging:
                outlet.lagging[internal] = (route.channel, Position(epoch, seq))
                self.dropped += 1
            elif len(out) + size > outlet.limit:
                self._overflow(outlet, route.channel, Position(epoch, seq))
            else:
                if not out:
                    dirty.append(outlet)
                out += frame
                delivered += 1
        self.delivered += delivered
        if route.views or route.taps:
            self._publish_views(route, epoch, seq, data)
        if was_clean and dirty:
            self.on_dirty()
        if route.pending and self.wants_state(internal):
            self._offer_current(internal)
        return delivered

    def _publish_views(self, route: _Route, epoch: str, seq: int, data: msgspec.Raw) -> None:
        """Each view's frames of one event, encoded once and queued to each of its
        subscribers (``_queue``); then the taps are told of it."""
        for view in route.views.values():
            try:
                frames = view.encode(epoch, seq, data)
            except Exception:  # another dialect's code: its failure costs its view this event
                self.undeliverable += 1
                continue
            if frames:
                self._queue(view.subscribers, frames)
        for tap in route.taps.values():
            try:
                tap(epoch, seq, data)
            except Exception:  # another dialect's code, as a view's: it loses this event
                self.undeliverable += 1

    def deliver(self, outlets: Iterable[Outlet], frames: bytes) -> int:
        """Queue the same frames to each outlet, frames of no one event (the Binance
        all-market arrays, sent on a timer); returns how many got them (``_queue``)."""
        was_clean = not self.dirty
        delivered = self._queue(outlets, frames)
        if was_clean and self.dirty:
            self.on_dirty()
        return delivered

    def _queue(self, outlets: Iterable[Outlet], frames: bytes) -> int:
        """Another dialect's frames to each of ``outlets``; one that has no room is marked slow
        (the gateway closes it) and gets nothing more."""
        dirty = self.dirty
        size = len(frames)
        delivered = 0
        for outlet in outlets:
            out = outlet.out
            if outlet.slow or len(out) + size > outlet.limit:
                self.dropped += 1  # slow already: nothing after the hole, it is closed
                if not outlet.slow:
                    outlet.slow = True
                    dirty.append(outlet)
            else:
                if not out:
                    dirty.append(outlet)
                out += frames
                delivered += 1
        self.delivered += delivered
        return delivered

    def _offer_current(self, internal: str) -> None:
        """Where ``current`` has the state (this process keeps the books), a waiting join
        starts from it once there is one (after the event that brought it went out)."""
        current = self._upstream.current(internal)
        if current is not None and current.data is not None:
            at = current.position
            state = (Entry(at.seq, current.data),)
            self.offer_state(internal, Recovery(at, recovered=False, current=state))

    def _undeliverable(self, route: _Route, at: Position) -> None:
        """A message no client can be sent is dropped, and every subscriber of its channel,
        joining ones included (after their replay), gets a resync notice for it: the
        stream goes on, nobody is left with a silent hole, and the node is not at risk."""
        self.undeliverable += 1
        self.resync(route.channel.internal, at)  # joining ones: a kept notice, in order

    def _keep(self, route: _Route, epoch: str, seq: int, data: msgspec.Raw | None) -> None:
        """Keep a live event (data None: a resync notice) for every joining subscriber."""
        for outlet, joining in list(route.pending.items()):  # a give-up makes one live
            self._keep_for(route, outlet, joining, (epoch, seq, data))

    def _keep_for(self, route: _Route, outlet: Outlet, joining: _Joining, kept: _Kept) -> None:
        """At most MAX_PENDING kept, events and notices alike: past that, a public stream's
        paced replay is given up (it goes on lagging), any other join ends like a slow
        reader."""
        if len(joining.kept) < MAX_PENDING:
            joining.kept.append(kept)
        elif joining.settled and not route.channel.private:
            self._give_up_replay(route, outlet, joining, Position(kept[0], kept[1]))
        elif not outlet.slow:  # a join that never settles: end it like a slow reader
            outlet.slow = True
            self.mark_dirty(outlet)

    def _give_up_replay(
        self, route: _Route, outlet: Outlet, joining: _Joining, lost: Position
    ) -> None:
        """A public stream's paced replay fell a whole ``MAX_PENDING`` behind the live stream:
        what is left is dropped and the subscriber goes on as a lagging one (a resync notice
        once its buffer has drained), as any slow reader of a public stream does."""
        joining.replay.clear()
        joining.kept.clear()
        self.dropped += 1
        outlet.lagging[route.channel.internal] = (route.channel, lost)
        self._feed(route, outlet, joining)

    def _catch_up(self, route: _Route, epoch: str, seq: int) -> None:
        """Subscribers whose replay was ahead go live with the first event they lack."""
        live = [o for o, upto in route.ahead.items() if seq > upto.seq or epoch != upto.epoch]
        for outlet in live:
            del route.ahead[outlet]
            route.subscribers[outlet] = None

    def send(self, outlet: Outlet, frame: bytes) -> None:
        """Queue a frame for one outlet (a reply); a reply that does not fit marks it slow."""
        if outlet.slow:
            return
        if len(outlet.out) + len(frame) > outlet.limit:
            outlet.slow = True
            self.mark_dirty(outlet)
            return
        was_empty = not outlet.out
        outlet.out += frame
        self.replies += 1
        if was_empty:
            self.mark_dirty(outlet)

    def settle_with_reply(
        self,
        outlet: Outlet,
        joins: list[tuple[Channel, Recovery | None]],
        reply: Callable[[list[Position | None]], bytes],
    ) -> None:
        """Settle each joining channel (``settle``), with the reply to the subscribe as the
        first frame the client reads of it: before the streams' first events, whatever they
        are. ``reply`` is given where each stream starts. An outlet that overflowed meanwhile
        gets no reply (it is closed as slow)."""
        mark = len(outlet.out)
        starts = [self.settle(outlet, channel, recovery) for channel, recovery in joins]
        frame = text_frame(reply(starts))
        if len(outlet.out) == mark:
            self.send(outlet, frame)
        elif not outlet.slow:
            outlet.out[mark:mark] = frame  # the events just queued follow it
            self.replies += 1

    def close_with(self, outlet: Outlet, frame: bytes) -> None:
        """Queue a connection's last frame (its close frame) as the next thing it reads:
        frames still queued are dropped (whole frames only: the rest of one a partial send
        began stays), and the outlet is no longer slow (the frame is written, whatever the
        limit)."""
        del outlet.out[outlet.head_left :]
        outlet.out += frame
        outlet.slow = False
        self.mark_dirty(outlet)

    def take_dirty(self) -> list[Outlet]:
        """The outlets with something to write since the last call (the flusher's round)."""
        dirty, self.dirty = self.dirty, []
        return dirty

    def drained(self, outlet: Outlet) -> None:
        """The outlet's buffer is empty again: each paced replay goes on, and each lagging
        channel resumes with its current state (a depth snapshot, ...) or, for a stream of
        events (trades), a resync notice."""
        for internal in list(outlet.replaying):
            route = self._routes.get(internal)
            joining = route.pending.get(outlet) if route is not None else None
            if route is None or joining is None:
                outlet.replaying.pop(internal, None)
            else:
                self._feed(route, outlet, joining)
        lagging, outlet.lagging = outlet.lagging, {}
        self.lag_resyncs += len(lagging)
        for channel, lost in lagging.values():
            if self._send_current(outlet, channel, after_lag=True) is None:
                self.send(outlet, text_frame(encode_resync(channel.protocol, lost.seq, lost.epoch)))

    def resync(self, internal: str, at: Position) -> int:
        """Events of ``internal`` up to ``at`` may not have reached this node (the bus lost
        them): every subscriber gets the current state or a resync notice. Returns how many."""
        route = self._routes.get(internal)
        if route is None:
            return 0
        for outlet in (*route.subscribers, *route.ahead):
            outlet.lagging[internal] = (route.channel, at)
            if not outlet.out:
                self.drained(outlet)
        told = len(route.subscribers) + len(route.ahead) + len(route.pending)
        self._keep(route, at.epoch, at.seq, None)  # told in order, after what was kept for them
        return told

    def resync_private(self, gap_at: float | None = None) -> int:
        """Events of private channels may have been lost before they got here (an ingest gap,
        at wall-clock time ``gap_at`` if known): every private subscriber of a channel this node
        followed by then gets a resync notice per private channel, at the seq its channel
        stands at (a channel followed only since missed nothing of it). Returns how many
        notices were queued."""
        told = 0
        for route in self._routes.values():
            if route.channel.private and (gap_at is None or route.began <= gap_at):
                at = self.position(route.channel.internal) or Position(route.epoch, route.seq)
                frame = text_frame(encode_resync(route.channel.protocol, at.seq, at.epoch))
                for outlet in (*route.subscribers, *route.ahead):
                    self.send(outlet, frame)
                    told += 1
                told += len(route.pending)
                self._keep(route, at.epoch, at.seq, None)
        return told

    def _overflow(self, outlet: Outlet, channel: Channel, lost: Position) -> None:
        self.dropped += 1
        if channel.private:
            if not outlet.slow:
                outlet.slow = True
                self.mark_dirty(outlet)
        else:
            outlet.lagging[channel.internal] = (channel, lost)

    def mark_dirty(self, outlet: Outlet) -> None:
        """Hand the outlet to the flusher (a slow one, so that the flusher closes it; a
        closing one, so that its close frame goes out)."""
        if not self.dirty:
            self.dirty.append(outlet)
            self.on_dirty()
        else:
            self.dirty.append(outlet)


def _viewers(route: _Route) -> int:
    return sum(len(view.subscribers) for view in route.views.values())
