"""Klines (candles) per interval, from 1m to 1M. No I/O.

Buckets are aligned in UTC as Binance aligns them: fixed lengths from the epoch for 1m to 1d,
weeks starting Monday 00:00, months starting on the 1st. A candle exists only for an interval
that had a trade (TradingView draws the gap); its ``closeTime`` is the last millisecond of the
interval. Trade times are taken as non-decreasing per symbol, as in the ticker.

``Klines`` keeps each interval's open candle and a ring of closed ones. A candle closes when a
trade of a later interval arrives or when the clock passes its end (``close_due``), whichever is
first; either way it is returned exactly once, so the stream pushes it once with
``closed: true``. Trades and the clock move one watermark: a trade stamped before it (a late
trade of a minute the clock already closed) counts in the open minute, at the watermark, and
never reopens a closed candle.

Beside OHLC, volume and quote volume, a candle carries its first and last trade ids and the
volumes of the trades whose taker bought (the Binance dialect's ``f``, ``L``, ``V``, ``Q``).
"""

from __future__ import annotations

import calendar
from collections import deque
from datetime import UTC, datetime

import msgspec

from pushd.channels import KLINE_INTERVALS
from pushd.market.decimals import EXACT, ZERO, text
from pushd.market.trades import PricedTrade

MINUTE_MS = 60_000
FIXED_MS: dict[str, int] = {
    "1m": MINUTE_MS, "3m": 3 * MINUTE_MS, "5m": 5 * MINUTE_MS, "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS, "1h": 60 * MINUTE_MS, "2h": 120 * MINUTE_MS, "4h": 240 * MINUTE_MS,
    "6h": 360 * MINUTE_MS, "8h": 480 * MINUTE_MS, "12h": 720 * MINUTE_MS,
    "1d": 1440 * MINUTE_MS, "1w": 7 * 1440 * MINUTE_MS,
}  # fmt: skip
MONDAY_OFFSET_MS = 4 * 1440 * MINUTE_MS  # 1970-01-01 was a Thursday; 1970-01-05 a Monday
HISTORY = 500


def bucket(interval: str, ts_ms: int) -> tuple[int, int]:
    """The ``(open time, close time)`` in ms of the ``interval`` candle holding ``ts_ms``."""
    if interval == "1M":
        day = datetime.fromtimestamp(ts_ms // 1000, UTC)
        start = calendar.timegm((day.year, day.month, 1, 0, 0, 0)) * 1000
        year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
        return start, end - 1
    length = FIXED_MS[interval]
    offset = MONDAY_OFFSET_MS if interval == "1w" else 0
    start = (ts_ms - offset) // length * length + offset
    return start, start + length - 1


class Candle(msgspec.Struct, gc=False):
    s: str
    i: str
    openTime: int
    closeTime: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quoteVolume: str
    count: int
    closed: bool
    # added after the first release (defaults: a candle stored by an older pushd still reads)
    firstId: int = -1  # the candle's first and last trade ids (trades come in id order)
    lastId: int = -1
    takerBuyVolume: str = "0"  # the quantity and quote amount of trades whose taker bought
    takerBuyQuoteVolume: str = "0"


class _Open:
    """A candle being built: the trades that set high and low are kept (Decimal and text)."""

    __slots__ = ("buy_quote", "buy_volume", "close", "count", "end", "first", "high", "last",
                 "low", "open", "quote", "start", "volume")  # fmt: skip

    def __init__(self, start: int, end: int, trade: PricedTrade) -> None:
        self.start, self.end = start, end
        self.open = self.close = trade.price_text
        self.high = self.low = trade
        self.first = self.last = trade.id
        self.volume = self.quote = self.buy_volume = self.buy_quote = ZERO
        self.count = 0

    def add(self, trade: PricedTrade) -> None:
        price = trade.price
        if price > self.high.price:
            self.high = trade
        elif price < self.low.price:
            self.low = trade
        self.close = trade.price_text
        self.last = trade.id
        self.volume = EXACT.add(self.volume, trade.qty)
        self.quote = EXACT.add(self.quote, trade.quote)
        if trade.taker_buy:
            self.buy_volume = EXACT.add(self.buy_volume, trade.qty)
            self.buy_quote = EXACT.add(self.buy_quote, trade.quote)
        self.count += 1

    def fold(self, later: _Open) -> None:
        """Take in a later candle of the same bucket (a closed minute)."""
        if later.high.price > self.high.price:
            self.high = later.high
        if later.low.price < self.low.price:
            self.low = later.low
        self.close = later.close
        self.last = later.last
        self.volume = EXACT.add(self.volume, later.volume)
        self.quote = EXACT.add(self.quote, later.quote)
        self.buy_volume = EXACT.add(self.buy_volume, later.buy_volume)
        self.buy_quote = EXACT.add(self.buy_quote, later.buy_quote)
        self.count += later.count

    def copy(self, start: int, end: int) -> _Open:
        twin = _Open(start, end, self.high)
        twin.open, twin.close, twin.low = self.open, self.close, self.low
        twin.first, twin.last = self.first, self.last
        twin.volume, twin.quote, twin.count = self.volume, self.quote, self.count
        twin.buy_volume, twin.buy_quote = self.buy_volume, self.buy_quote
        return twin


class Klines:
    """Every interval's candles of one symbol.

    A trade updates only the open minute. When a minute closes it is folded into the open
    candle of each longer interval (every longer bucket is a union of whole minutes), so a
    trade costs one candle update, not fourteen. A longer interval's open candle is what its
    closed minutes add up to, plus the open minute.
    """

    def __init__(self, symbol: str, history: int = HISTORY) -> None:
        self.symbol = symbol
        self.closed: dict[str, deque[Candle]] = {
            iv: deque(maxlen=history) for iv in KLINE_INTERVALS
        }
        self._minute: _Open | None = None
        self._longer: dict[str, _Open | None] = dict.fromkeys(KLINE_INTERVALS[1:])
        self._last_ts = 0
        self.changed = False  # a trade since the open candles were last taken

    def add(self, trade: PricedTrade) -> list[Candle]:
        """Count a trade; returns the candles it closed (it opened a later interval)."""
        self._last_ts = max(self._last_ts, trade.ts)
        done = self._roll(self._last_ts)
        if self._minute is None:
            self._minute = _Open(*bucket("1m", self._last_ts), trade)
        self._minute.add(trade)
        self.changed = True
        return done

    def close_due(self, now_ms: int) -> list[Candle]:
        """The open candles whose end the clock has passed, closed.

        The clock is a watermark, as a trade's time is: a trade stamped before it counts at it,
        so a late trade lands in the open minute and never reopens a closed candle."""
        self._last_ts = max(self._last_ts, now_ms)
        return self._roll(self._last_ts)

    def current(self, interval: str) -> Candle | None:
        """The open candle of ``interval``, or None if it has no trade yet."""
        minute = self._minute
        if interval == "1m":
            return self._candle("1m", minute, closed=False) if minute is not None else None
        acc = self._longer[interval]
        if acc is None:
            if minute is None:
                return None
            return self._candle(interval, minute.copy(*bucket(interval, minute.start)), False)
        if minute is None:
            return self._candle(interval, acc, closed=False)
        merged = acc.copy(acc.start, acc.end)
        merged.fold(minute)
        return self._candle(interval, merged, closed=False)

    def history(self, interval: str, limit: int) -> list[Candle]:
        """The last ``limit`` candles, oldest first, the open one last."""
        candles = list(self.closed[interval])
        if (candle := self.current(interval)) is not None:
            candles.append(candle)
        return candles[-limit:] if limit > 0 else []

    def _roll(self, ts: int) -> list[Candle]:
        done: list[Candle] = []
        minute = self._minute
        if minute is not None and ts > minute.end:
            done.append(self._close("1m", minute))
            self._minute = None
            for interval, acc in self._longer.items():
                if acc is None:
                    self._longer[interval] = minute.copy(*bucket(interval, minute.start))
                else:
                    acc.fold(minute)
        for interval, acc in self._longer.items():
            if acc is not None and ts > acc.end:
                done.append(self._close(interval, acc))
                self._longer[interval] = None
        return done

    def _close(self, interval: str, candle: _Open) -> Candle:
        closed = self._candle(interval, candle, closed=True)
        self.closed[interval].append(closed)
        return closed

    def _candle(self, interval: str, c: _Open, closed: bool) -> Candle:
        return Candle(
            self.symbol, interval, c.start, c.end, c.open, c.high.price_text, c.low.price_text,
            c.close, text(c.volume), text(c.quote), c.count, closed, c.first, c.last,
            text(c.buy_volume), text(c.buy_quote),
        )  # fmt: skip
