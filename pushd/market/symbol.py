"""All market streams of one symbol, and what they have to publish. No I/O, no clock.

The Trio shell (``pushd.market.markets``) feeds events in (``trade``, ``index_price``, ``book``,
``gap``), calls ``tick(now_ms)`` on a timer, and publishes what ``take()`` returns, in order:
``(internal channel, JSON bytes)`` pairs. The shell publishes after every call that can queue
something, in the same step, so what was queued last on a channel is what was published last.
``current(internal)`` is the state a new subscriber of a stream gets first: the depth snapshot,
or the last ticker, mark price or candle pushed, exactly as of the channel's seq.

Time: ticker and klines share one watermark, the latest of the trade times and of the clock's
``tick``. A trade counts at ``max(its time, watermark)``, so a trade that arrives after the
timer closed its minute counts in the open minute and never reopens a closed candle.
"""

from __future__ import annotations

import msgspec

from ingest import wire
from pushd.channels import KLINE_INTERVALS, market_channel
from pushd.config import MarketConfig
from pushd.market.depth import DepthBook
from pushd.market.funding import FundingState
from pushd.market.kline import Candle, Klines
from pushd.market.ticker import Ticker
from pushd.market.trades import PricedTrade, TradeBatch, TradeMerger, item

_encode = msgspec.json.Encoder().encode


class SymbolMarket:
    def __init__(self, symbol: str, config: MarketConfig) -> None:
        self.symbol = symbol
        self.config = config
        self.depth = DepthBook(symbol)
        self.trades = TradeMerger(symbol)
        self.ticker = Ticker(symbol)
        self.funding = FundingState(symbol, config.funding)
        self.klines = Klines(symbol)
        self.last_price: str | None = None
        self.channels = {
            stream: market_channel(stream, symbol)
            for stream in ("depth", "trades", "ticker", "markPrice")
        }
        self._kline_channels = {iv: market_channel("kline", symbol, iv) for iv in KLINE_INTERVALS}
        self._by_channel: dict[str, str] = {ch: s for s, ch in self.channels.items()}
        self._by_channel.update({ch: iv for iv, ch in self._kline_channels.items()})
        self._due = {"trades": 0, "ticker": 0, "kline": 0, "markPrice": 0}
        self._outbox: list[tuple[str, bytes, bool]] = []
        self._flushed: list[TradeBatch] = []  # trade batches in the outbox
        self.last: dict[str, msgspec.Struct] = {}  # channel -> the last payload queued
        self.watermark = 0  # ms: ticker and klines never go back before it
        self.late_trades = 0  # trades stamped before the watermark

    # -- input --------------------------------------------------------------------------------

    def trade(self, trade: wire.Trade) -> None:
        self.trades.add(trade)
        for closed in self._count(trade):
            self._put(self._kline_channels[closed.i], closed)

    def replay(self, trade: wire.Trade) -> None:
        """A trade of the engine's past, loaded before serving: counted in the ticker, the
        candles and the recent trades like a live one, and pushed on no channel (nobody was
        subscribed then; the first tick pushes the ticker and open candles it led to)."""
        self.trades.recent.append(item(trade))
        self._count(trade)

    def _count(self, trade: wire.Trade) -> list[Candle]:
        """The trade in the ticker and klines, at the watermark; the candles it closed."""
        priced = PricedTrade(trade)
        if priced.ts < self.watermark:
            priced.ts = self.watermark
            self.late_trades += 1
        else:
            self.watermark = priced.ts
        self.ticker.add(priced)
        self.last_price = trade.price
        return self.klines.add(priced)

    def index_price(self, event: wire.IndexPrice) -> bool:
        """False when the event was ignored (one source too many)."""
        return self.funding.index_price(event.source, event.price, event.ts)

    def book(self, snapshot: wire.BookSnapshot) -> None:
        top = self.depth.top()
        event = self.depth.apply(snapshot)
        if event is not None:
            self._put(self.channels["depth"], event)
            if self.depth.top() != top:  # the ticker says the top of the book
                self.ticker.changed = True

    def gap(self) -> None:
        """Ingest lost frames that may have carried this symbol's trades."""
        self.trades.mark_gap()

    def take_over(self, last_trade_id: int | None) -> None:
        """This node starts publishing the symbol (a standby taking over, or a leader taking its
        lease again after an outage): every state stream goes out whole, since the last
        publisher's depth diffs chained to its own book and Redis may have lost the stored
        states; the trades this node computed and did not publish go out after
        ``last_trade_id``, the last one on the tape (see ``TradeMerger.hand_over``)."""
        if self.depth.ready:
            self._put(self.channels["depth"], self.depth.snapshot())
        batch = self.trades.hand_over(last_trade_id)
        if batch is not None:
            self._put(self.channels["trades"], batch)
        for channel, state in list(self.last.items()):
            if channel not in (self.channels["depth"], self.channels["trades"]):
                self._put(channel, state, archive=False)  # (a closed candle: archived once)

    # -- output -------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        """Queue every push that is due at ``now_ms``."""
        self.watermark = now_ms = max(self.watermark, now_ms)
        cfg, due = self.config, self._due
        if now_ms >= due["trades"]:
            due["trades"] = now_ms + cfg.trades_interval_ms
            batch = self.trades.flush()
            if batch is not None:
                self._put(self.channels["trades"], batch)
                self._flushed.append(batch)
        self.funding.sample(now_ms, self.depth.bids, self.depth.asks)
        for closed in self.klines.close_due(now_ms):
            self._put(self._kline_channels[closed.i], closed)
        if now_ms >= due["kline"] and self.klines.changed:
            due["kline"] = now_ms + cfg.kline_interval_ms
            self.klines.changed = False
            for interval, channel in self._kline_channels.items():
                if (candle := self.klines.current(interval)) is not None:
                    self._put(channel, candle)
        if now_ms >= due["ticker"]:
            due["ticker"] = now_ms + cfg.ticker_interval_ms
            self.ticker.expire(now_ms)
            ticker = self.ticker.data(now_ms, *self.depth.top()) if self.ticker.changed else None
            if ticker is not None:
                self.ticker.changed = False
                self._put(self.channels["ticker"], ticker)
        if now_ms >= due["markPrice"]:
            due["markPrice"] = now_ms + cfg.mark_interval_ms
            mark = self.funding.data(now_ms, self.last_price)
            if mark is not None:
                self._put(self.channels["markPrice"], mark)

    @property
    def has_output(self) -> bool:
        return bool(self._outbox)

    def take(self, *, published: bool = True) -> list[tuple[str, bytes, bool]]:
        """What to publish, in order: (internal channel, JSON, whether it is a closed candle,
        which a bus without this book keeps for kline history). ``published``: whether the
        shell publishes it (False: another node leads the symbol; the trades are kept for a
        hand-over)."""
        out, self._outbox = self._outbox, []
        for batch in self._flushed:
            (self.trades.published if published else self.trades.withheld)(batch)
        self._flushed = []
        return out

    def current(self, internal: str, *, stale: bool = False) -> bytes | None:
        """What a new subscriber of ``internal`` gets first; None for trades and unknowns.
        ``stale`` marks a depth snapshot that may be behind the engine (``"stale": true``)."""
        if internal == self.channels["depth"]:
            if not self.depth.ready:
                return None
            snapshot = self.depth.snapshot()
            return _encode(msgspec.structs.replace(snapshot, stale=True) if stale else snapshot)
        if internal == self.channels["trades"]:
            return None
        state = self.last.get(internal)
        return _encode(state) if state is not None else None

    def closed_candles(self, internal: str, most: int) -> list[Candle]:
        """The last ``most`` closed candles of a kline channel, oldest first."""
        closed = self.klines.closed.get(self._by_channel.get(internal, ""))
        return list(closed)[-most:] if closed is not None else []

    def klines_history(self, interval: str, limit: int) -> list[Candle]:
        """The last ``limit`` candles pushed on the interval's channel, oldest first: the closed
        ones, then the open one as last pushed (trades since are in the next push)."""
        channel = self._kline_channels[interval]
        candles = self.closed_candles(channel, limit)
        pushed = self.last.get(channel)
        if isinstance(pushed, Candle) and not pushed.closed:
            candles.append(pushed)
        return candles[-limit:]

    def channel_names(self) -> list[str]:
        return list(self._by_channel)

    def _put(self, channel: str, payload: msgspec.Struct, *, archive: bool = True) -> None:
        self.last[channel] = payload
        closed = archive and isinstance(payload, Candle) and payload.closed
        self._outbox.append((channel, _encode(payload), closed))
