"""The Binance dialect's Trio shell: a ``Dialect`` (``pushd.gateway.requests``) over the hub.

Per connection: a sans-IO ``Session`` (``pushd.binance.session``), a request-rate bucket (the
``[limits]`` ones), and a task that pings every ``ping_interval_s``. Each subscribed stream is
a hub *view* of its internal channel, keyed ``(market, stream name, combined)``: every
connection with the same key shares the one encoding of each event (``frames``).

Per surface: the all-market streams (``pushd.binance.arrays``): while anyone follows one, the
hub taps every symbol's channel of its source for the dialect, and one task in the gateway's
nursery (``serving``) sends the arrays each ``INTERVAL_S``; it ends with the last follower.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

import msgspec
import structlog
import trio
from wsproto.events import Ping

from pushd.auth import Verifier
from pushd.binance.arrays import INTERVAL_S, AllMarket, Source
from pushd.binance.paths import opening
from pushd.binance.payloads import Mirrors, Translator
from pushd.binance.session import Session, error
from pushd.binance.streams import Market, Stream
from pushd.bus.model import Recovery
from pushd.channels import market_channel, parse_internal
from pushd.config import BinanceSurfaceConfig, LimitsConfig
from pushd.errors import BinanceError, CloseCode
from pushd.gateway import lifecycle
from pushd.gateway.connection import Connection
from pushd.gateway.hub import Hub, Outlet, ViewEncoder, text_frame
from pushd.gateway.lifecycle import Disconnect, Phase
from pushd.gateway.ratelimit import TokenBucket
from pushd.logs import ThrottledLog

INVALID_STREAM = Disconnect(CloseCode.POLICY_VIOLATION, "invalid stream name", "binance_stream")
NO_PONG = Disconnect(CloseCode.POLICY_VIOLATION, "no pong", "binance_no_pong")

ViewKey = tuple[Market, str, bool]

log = structlog.get_logger("pushd.binance.dialect")
_unreadable = ThrottledLog(log, "binance: an event its stream cannot be made of, not sent")
_unreadable_arrays = ThrottledLog(log, "binance: a symbol's data left out of an all-market array")


class Frames:
    """A view's encoder (``Hub.join_view``): one native event as this stream's whole frames
    (``Translator``), wrapped ``{"stream":..,"data":..}`` when ``combined``; a stream read off
    the book says when it has none (``wants_state``) and takes one the bus offers."""

    __slots__ = ("_head", "_translate", "combined")

    def __init__(
        self, stream: Stream, market: Market, combined: bool, hub: Hub,
        mirrors: Mirrors | None = None,
    ) -> None:  # fmt: skip
        """``mirrors``: the dialect's books, one per channel for all its views (else this
        view's own)."""
        mirror = mirrors.get(stream.internal) if mirrors is not None else None
        self._translate = Translator(
            stream, market, functools.partial(hub.current, stream.internal), mirror
        )
        self._head = b'{"stream":"' + stream.name.encode() + b'","data":'
        self.combined = combined

    def __call__(self, epoch: str, seq: int, data: msgspec.Raw) -> bytes:
        try:
            payloads = self._translate(epoch, seq, data)
        except Exception:  # data it cannot read (msgspec's ValueError, decimal's
            # InvalidOperation: anyone who can publish a market channel can send it) or a bug:
            # this view goes without this event, nobody else notices
            _unreadable.warning(stream=self._translate.stream.name, seq=seq, exc_info=True)
            return b""
        if self.combined:
            payloads = [self._head + p + b"}" for p in payloads]
        return b"".join(text_frame(p) for p in payloads)

    @property
    def wants_state(self) -> bool:
        return self._translate.wants_state

    def offer_state(self, recovery: Recovery) -> None:
        self._translate.offer_state(recovery)


def frames(
    stream: Stream, market: Market, combined: bool, hub: Hub, mirrors: Mirrors | None = None
) -> ViewEncoder:
    return Frames(stream, market, combined, hub, mirrors)


class _State:
    __slots__ = ("requests", "session")

    def __init__(self, session: Session, requests: TokenBucket) -> None:
        self.session = session
        self.requests = requests


class BinanceDialect:
    """The Binance surface's ``Dialect`` for one market (spot or USD-M futures)."""

    def __init__(
        self, symbols: Collection[str], market: Market, surface: Callable[[], BinanceSurfaceConfig],
        limits: LimitsConfig, hub: Hub, end: Callable[[Connection, Disconnect], None],
    ) -> None:  # fmt: skip
        self._symbols = symbols
        self._market = market
        self._surface = surface  # the current config's (a reload's ping interval, limit)
        self._limits = limits
        self._hub = hub
        self._end = end
        self._states: dict[Connection, _State] = {}
        self._mirrors = Mirrors(hub.current)  # partial depth and bookTicker: a book per channel
        self._every = AllMarket[Outlet](market)  # the all-market streams' followers and data
        self._nursery: trio.Nursery | None = None  # the gateway's (``serving``)
        self._arrays: trio.CancelScope | None = None  # the all-market task's, while it runs

    def serving(self, nursery: trio.Nursery) -> None:
        """The gateway serves: the all-market task is started in its nursery when needed."""
        self._nursery = nursery

    def reconfigure(self, limits: LimitsConfig, verifier: Verifier) -> None:
        """A reload's request rate, for new connections and those open (as pushd's own)."""
        self._limits = limits
        for state in self._states.values():
            state.requests.retune(limits.messages_per_second, limits.message_burst)

    def opened(self, conn: Connection, now: float) -> None:
        asked = opening(conn.target)
        limits = self._limits
        session = Session(self._symbols, self._market, self._surface().max_streams, asked.combined)
        state = _State(session, TokenBucket(limits.messages_per_second, limits.message_burst, now))
        self._states[conn] = state
        conn.leave = functools.partial(self._leave_all, conn, session)
        if conn.nursery is not None:
            conn.nursery.start_soon(self._pings, conn)
        if asked.streams:  # /ws/<streamName>, /stream?streams=a/b/c
            try:
                streams = session.subscribe(session.parse_streams(asked.streams))
            except BinanceError:  # closed once open (the handshake is answered already)
                if conn.nursery is not None:
                    conn.nursery.start_soon(self._refuse, conn)
                return
            self._join(conn, session, streams)

    def closed(self, conn: Connection) -> None:
        self._states.pop(conn, None)

    async def on_message(self, conn: Connection, text: str, binary: bool) -> None:
        state = self._states.get(conn)
        if state is None or conn.closing:
            return
        now = trio.current_time()
        if not state.requests.has_token(now):
            self._end(conn, lifecycle.RATE_LIMITED)
            return
        session = state.session
        if binary:
            state.requests.take(now)
            conn.send(text_frame(error(3, "Invalid JSON: a request is a text message", None)))
            return
        was_combined = session.combined
        step = session.handle(text)
        for stream in step.leave:  # the session let them go, refused or not: released here
            self._leave(conn, stream, was_combined)  # (``_leave_all`` no longer sees them)
        if not state.requests.take(now, step.cost):  # many streams at once: their weight
            self._end(conn, lifecycle.RATE_LIMITED)  # (at most the whole burst)
            return
        conn.send(text_frame(step.reply))
        if step.reform:  # every stream again, in the new payload form: joined before the
            streams = list(session.streams.values())  # old form is left, so what they follow
            self._join(conn, session, streams)  # stays followed (no untap, no Redis churn)
            for stream in streams:
                self._leave(conn, stream, was_combined)
        self._join(conn, session, step.join)

    def _key(self, stream: Stream, combined: bool) -> ViewKey:
        return (self._market, stream.name, combined)

    def _join(self, conn: Connection, session: Session, streams: list[Stream]) -> None:
        for stream in streams:
            if stream.every:
                self._follow(conn.outlet, stream, session.combined)
                continue
            # pushd's own channel: a route made by this view names native frames after it
            channel = parse_internal(stream.internal, self._symbols)
            make = functools.partial(
                frames, stream, self._market, session.combined, self._hub, self._mirrors
            )
            self._hub.join_view(conn.outlet, channel, self._key(stream, session.combined), make)

    def _leave(self, conn: Connection, stream: Stream, combined: bool) -> None:
        if not stream.every:
            self._hub.leave_view(conn.outlet, stream.internal, self._key(stream, combined))
        elif (source := self._every.unfollow(stream, combined, conn.outlet)) is not None:
            for symbol in self._symbols:  # nobody follows what it is made of any more
                self._hub.untap(market_channel(source, symbol), self._market)
            if not self._every.follows() and self._arrays is not None:
                self._arrays.cancel()  # nobody follows any: the task ends now
                self._arrays = None

    def _leave_all(self, conn: Connection, session: Session) -> None:
        for stream in session.streams.values():
            self._leave(conn, stream, session.combined)
        session.streams.clear()

    def _follow(self, outlet: Outlet, stream: Stream, combined: bool) -> None:
        """An all-market stream: the source's channels tapped for the first follower, and the
        task that sends the arrays started if it does not run."""
        source = self._every.follow(stream, combined, outlet)
        if source is not None:
            for symbol in self._symbols:
                channel = parse_internal(market_channel(source, symbol), self._symbols)
                tap = functools.partial(self._changed, source, symbol)
                self._hub.tap(channel, self._market, tap)
        if self._arrays is None and self._nursery is not None:
            self._arrays = trio.CancelScope()
            self._nursery.start_soon(self._send_arrays, self._arrays)

    def _changed(
        self, source: Source, symbol: str, _epoch: str, _seq: int, data: msgspec.Raw
    ) -> None:
        self._every.changed(source, symbol, data)

    async def _send_arrays(self, scope: trio.CancelScope) -> None:
        """Each ``INTERVAL_S`` the arrays of what changed (``AllMarket.due``), framed once
        each for all their followers, until ``scope`` is cancelled (the last follower left)."""
        with scope:
            due = trio.current_time()
            while True:
                due = max(due + INTERVAL_S, trio.current_time())  # late: no catching up
                await trio.sleep_until(due)
                try:
                    self.send_arrays()
                except Exception:  # a bug in one interval's arrays costs that interval, not
                    # the surface (this task runs in the gateway's nursery)
                    log.exception("all-market arrays failed", market=self._market)

    def send_arrays(self) -> None:
        """One interval's arrays, queued to their followers."""
        unreadable = self._every.unreadable
        for payload, followers in self._every.due():
            self._hub.deliver(followers, text_frame(payload))
        if self._every.unreadable != unreadable:
            _unreadable_arrays.warning(market=self._market)

    async def _refuse(self, conn: Connection) -> None:
        self._end(conn, INVALID_STREAM)

    async def _pings(self, conn: Connection) -> None:
        """Binance's server pings; a client that has sent no pong for ``pong_timeout_s``
        since the first unanswered ping is closed."""
        unanswered_since: float | None = None
        while True:
            await trio.sleep(self._surface().ping_interval_s)
            ws = conn.ws
            if conn.phase is not Phase.OPEN or ws is None:
                return
            now = trio.current_time()
            if unanswered_since is not None and conn.pong_at >= unanswered_since:
                unanswered_since = None  # answered
            if unanswered_since is None:
                unanswered_since = now
            elif now - unanswered_since >= self._surface().pong_timeout_s:
                self._end(conn, NO_PONG)
                return
            conn.send(ws.send(Ping(b"")))
