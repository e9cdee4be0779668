"""The market streams' Trio shell: feeds the per-symbol computations and publishes their output.

Engine trades and index prices arrive from ingest, books from the poller; every
``TICK_MS`` the timer task lets each symbol queue what is due (trade batches, tickers, candles,
mark prices) and publishes it. A depth diff is published as soon as its snapshot arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
import structlog
import trio

from ingest import wire
from pushd.bus.model import Bus, Outgoing, Snapshot
from pushd.config import MarketConfig
from pushd.logs import ThrottledLog
from pushd.market.symbol import SymbolMarket
from pushd.market.trades import TradeBatch

log = structlog.get_logger("pushd.market.markets")

_encode = msgspec.json.Encoder().encode

TICK_MS = 50
FUTURE_TOLERANCE_MS = 60_000  # engine clocks ahead of ours by more than this are not trusted


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Markets:
    """The daemon's market side: ingest's MarketSink, the poller's book callback, and in one
    process the states a new subscriber starts from and REST serves (``LocalBackplane``)."""

    def __init__(
        self,
        markets: dict[str, MarketConfig],
        bus: Bus,
        refresh_book: Callable[[str], None],
        *,
        stale: Callable[[str], bool] = lambda _symbol: False,
        leads: Callable[[str], bool] = lambda _symbol: True,
        tick_late: Callable[[float], None] = lambda _s: None,
    ) -> None:
        """``stale``: whether a symbol's book may be behind the engine's (the daemon knows the
        poller); ``leads``: whether this node publishes a symbol (with two compute nodes, the
        lease holder); ``tick_late``: how late each tick ran, in seconds (a busy loop delays
        every market stream)."""
        self.symbols = {symbol: SymbolMarket(symbol, cfg) for symbol, cfg in markets.items()}
        self._bus = bus
        self._refresh_book = refresh_book
        self._by_channel: dict[str, SymbolMarket] = {}
        for market in self.symbols.values():
            for internal in market.channel_names():
                self._by_channel[internal] = market
        self.trades = 0
        self.resyncs = 0
        self.future_trades = 0
        self.failures = 0  # computations that raised (a bug): logged, that step skipped
        self.ignored_index_sources = 0
        self._resync_log = ThrottledLog(log, "resync after an ingest loss")
        self._sources_log = ThrottledLog(log, "index source ignored: too many sources")
        self._tick_log = ThrottledLog(log, "market tick failed")
        self._current: dict[str, tuple[Snapshot, bool]] = {}  # -> (state, stale)
        self._diffs_since_book: dict[str, int] = {}  # symbol -> depth diffs without a book
        self.stale = stale
        self.leads = leads
        self._future_log = ThrottledLog(log, "trade stamped in the future: counted at our time")
        self.tick_late = tick_late

    def trade(self, trade: wire.Trade) -> None:
        """Feed one engine trade. A trade stamped more than ``FUTURE_TOLERANCE_MS`` ahead of
        this host's clock counts at the host's time: the ticker and klines take trade times as
        non-decreasing, so one bad engine clock would otherwise freeze them until that time."""
        self.trades += 1
        now = wall_ms()
        if trade.ts > now + FUTURE_TOLERANCE_MS:
            self.future_trades += 1
            self._future_log.warning(symbol=trade.symbol, trade_id=trade.id, ts=trade.ts, now=now)
            trade = msgspec.structs.replace(trade, ts=now)
        market = self.symbols[trade.symbol]
        market.trade(trade)
        if market.has_output:  # a trade that closed candles: they go out now, with their seq
            self._publish(market)

    def replay(self, trades: Iterable[wire.Trade]) -> None:
        """The engine's past, oldest first, before serving (the demo's simulated day): see
        ``SymbolMarket.replay``. Trades of symbols not configured here are skipped."""
        for trade in trades:
            if (market := self.symbols.get(trade.symbol)) is not None:
                market.replay(trade)

    def index_price(self, event: wire.IndexPrice) -> None:
        if not self.symbols[event.symbol].index_price(event):
            self.ignored_index_sources += 1
            self._sources_log.warning(symbol=event.symbol, source=event.source[:32])

    def book(self, snapshot: wire.BookSnapshot) -> None:
        market = self.symbols[snapshot.symbol]
        try:
            market.book(snapshot)
        except Exception:  # a book that trips a bug: this symbol's book waits for the next
            self.failures += 1
            log.exception("book snapshot failed", symbol=snapshot.symbol)
        self._publish(market)

    def resync(self, symbols: set[str], reason: str) -> None:
        self.resyncs += 1
        self._resync_log.warning(symbols=sorted(symbols), reason=reason)
        for symbol in symbols:
            self.symbols[symbol].gap()
            self._refresh_book(symbol)

    def current(self, internal: str) -> Snapshot | None:
        """A stream's current state and the position it stands at exactly, for a new subscriber
        and a REST snapshot alike (one process: ``pushd.bus.backplane.LocalBackplane``).

        Encoded once per seq (and staleness): a reconnect storm of thousands of depth
        subscribers gets one snapshot, not thousands (the hub frames it once too).
        """
        market = self._by_channel.get(internal)
        if market is None:
            return None
        at = self._bus.position(internal)
        if at is None:
            return None
        stale = internal == market.channels["depth"] and self.stale(market.symbol)
        cached = self._current.get(internal)
        if cached is not None and cached[0].position == at and cached[1] == stale:
            return cached[0]
        data = market.current(internal, stale=stale)
        if data is None:
            return None
        current = Snapshot(at, msgspec.Raw(data))
        self._current[internal] = (current, stale)
        return current

    def recent(self, internal: str, most: int) -> list[msgspec.Raw]:
        """A trades channel's last ``most`` trades, as one trade batch (REST)."""
        market = self._by_channel.get(internal)
        if market is None or internal != market.channels["trades"]:
            return []
        trades = list(market.trades.recent)[-most:]
        return [msgspec.Raw(_encode(TradeBatch(market.symbol, trades)))]

    def archived(self, internal: str, most: int) -> list[msgspec.Raw]:
        """A kline channel's last ``most`` closed candles, oldest first (REST)."""
        market = self._by_channel.get(internal)
        if market is None:
            return []
        return [msgspec.Raw(_encode(candle)) for candle in market.closed_candles(internal, most)]

    def book_stale(self, symbol: str) -> bool:
        """Whether ``symbol``'s book may be behind the engine's (False for unknown symbols)."""
        return symbol in self.symbols and self.stale(symbol)

    def tick(self, now_ms: int) -> None:
        for market in self.symbols.values():
            try:
                market.tick(now_ms)
            except Exception:  # one symbol's fault stops neither the timer nor other symbols
                self.failures += 1
                self._tick_log.warning(symbol=market.symbol, exc_info=True)
            self._publish(market)

    async def run(self) -> None:
        """Tick every ``TICK_MS`` until cancelled."""
        next_at = trio.current_time()
        while True:
            self.tick_late(trio.current_time() - next_at)
            self.tick(wall_ms())
            next_at = max(next_at + TICK_MS / 1000, trio.current_time())
            await trio.sleep_until(next_at)

    def reconfigure(self, markets: dict[str, MarketConfig]) -> None:
        """A reload: the timers' intervals (the symbols and their maths stay)."""
        for symbol, config in markets.items():
            self.symbols[symbol].config = config

    def take_over(self, symbol: str, last_trade_id: int | None) -> None:
        """This node now publishes ``symbol`` (``last_trade_id``: the last trade on the tape,
        None if unknown): see ``SymbolMarket.take_over``. Called while ``leads`` is not yet
        true, so that nothing computed meanwhile overtakes the hand-over."""
        market = self.symbols[symbol]
        self._publish(market)  # what was computed before the hand-over is kept for it
        market.take_over(last_trade_id)
        self._diffs_since_book.pop(symbol, None)  # the snapshot carries the book to store
        self._publish(market, leading=True)

    def _publish(self, market: SymbolMarket, *, leading: bool | None = None) -> None:
        if leading is None:
            leading = self.leads(market.symbol)
        items = market.take(published=leading)
        if not items or not leading:  # a standby computes, and keeps quiet
            return
        out = [
            Outgoing(channel, msgspec.Raw(data), archive=closed) for channel, data, closed in items
        ]
        if self._bus.state_every:
            self._attach_book(market, out)
        self._bus.publish(out)

    def _attach_book(self, market: SymbolMarket, out: list[Outgoing]) -> None:
        """Every ``state_every``-th depth diff of a symbol carries the book after it, so that
        nodes without the book can start new subscribers (the Redis bus keeps it)."""
        depth = market.channels["depth"]
        last = max((i for i, item in enumerate(out) if item.channel == depth), default=None)
        if last is None:
            return
        due = self._diffs_since_book.get(market.symbol, self._bus.state_every)
        if due + 1 < self._bus.state_every:
            self._diffs_since_book[market.symbol] = due + 1
            return
        book = market.current(depth, stale=self.stale(market.symbol))
        if book is not None:
            out[last] = Outgoing(depth, out[last].data, msgspec.Raw(book))
            self._diffs_since_book[market.symbol] = 0
