"""All market streams of one symbol, and what they have to publish. No I/O, no clock.

The Trio shell (``pushd.markets``) feeds events in (``trade``, ``index_price``, ``book``,
``gap``), calls ``tick(now_ms)`` on a timer, and publishes what ``take()`` returns, in order:
``(internal channel, JSON bytes)`` pairs. ``current(internal, now_ms)`` is the state a new
subscriber of a stream gets first (the depth snapshot, the ticker, the open candle, ...).
"""

from __future__ import annotations

import msgspec

from ingest import wire
from pushd.channels import KLINE_INTERVALS, market_channel
from pushd.config import MarketConfig
from pushd.market.depth import DepthBook
from pushd.market.funding import FundingState
from pushd.market.kline import Klines
from pushd.market.ticker import Ticker
from pushd.market.trades import PricedTrade, TradeMerger

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
        self._outbox: list[tuple[str, bytes]] = []

    # -- input --------------------------------------------------------------------------------

    def trade(self, trade: wire.Trade) -> None:
        self.trades.add(trade)
        priced = PricedTrade(trade)
        self.ticker.add(priced)
        self.last_price = trade.price
        for closed in self.klines.add(priced):
            self._put(self._kline_channels[closed.i], closed)

    def index_price(self, event: wire.IndexPrice) -> None:
        self.funding.index_price(event.source, event.price, event.ts)

    def book(self, snapshot: wire.BookSnapshot) -> None:
        event = self.depth.apply(snapshot)
        if event is not None:
            self._put(self.channels["depth"], event)

    def gap(self) -> None:
        """Ingest lost frames that may have carried this symbol's trades."""
        self.trades.mark_gap()

    # -- output -------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        """Queue every push that is due at ``now_ms``."""
        cfg, due = self.config, self._due
        if now_ms >= due["trades"]:
            due["trades"] = now_ms + cfg.trades_interval_ms
            batch = self.trades.flush()
            if batch is not None:
                self._put(self.channels["trades"], batch)
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
            if self.ticker.changed and (ticker := self.ticker.data(now_ms)) is not None:
                self.ticker.changed = False
                self._put(self.channels["ticker"], ticker)
        if now_ms >= due["markPrice"]:
            due["markPrice"] = now_ms + cfg.mark_interval_ms
            mark = self.funding.data(now_ms, self.last_price)
            if mark is not None:
                self._put(self.channels["markPrice"], mark)

    def take(self) -> list[tuple[str, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def current(self, internal: str, now_ms: int) -> bytes | None:
        """What a new subscriber of ``internal`` gets first; None for trades and unknowns."""
        stream = self._by_channel.get(internal)
        state: msgspec.Struct | None = None
        if stream == "depth":
            state = self.depth.snapshot() if self.depth.ready else None
        elif stream == "ticker":
            state = self.ticker.data(now_ms)
        elif stream == "markPrice":
            state = self.funding.data(now_ms, self.last_price)
        elif stream in self._kline_channels:
            state = self.klines.current(stream)
        return _encode(state) if state is not None else None

    def channel_names(self) -> list[str]:
        return list(self._by_channel)

    def _put(self, channel: str, payload: msgspec.Struct) -> None:
        self._outbox.append((channel, _encode(payload)))
