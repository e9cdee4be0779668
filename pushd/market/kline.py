"""Klines (candles) per interval, from 1m to 1M. No I/O.

Buckets are aligned in UTC as Binance aligns them: fixed lengths from the epoch for 1m to 1d,
weeks starting Monday 00:00, months starting on the 1st. A candle exists only for an interval
that had a trade (TradingView draws the gap); its ``closeTime`` is the last millisecond of the
interval. Trade times are taken as non-decreasing per symbol, as in the ticker.

``KlineSeries`` keeps the open candle and a ring of closed ones. A candle closes when a trade of
a later interval arrives or when the clock passes its end (``close_due``), whichever is first;
either way it is returned exactly once, so the stream pushes it once with ``closed: true``.
"""

from __future__ import annotations

import calendar
from collections import deque
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from ingest import wire
from pushd.channels import KLINE_INTERVALS
from pushd.market.decimals import EXACT, text

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


class _Open:
    __slots__ = ("close", "count", "end", "high", "low", "open", "quote", "start", "volume")

    def __init__(self, start: int, end: int, price: str) -> None:
        self.start, self.end = start, end
        self.open = self.high = self.low = self.close = price
        self.volume = Decimal(0)
        self.quote = Decimal(0)
        self.count = 0


class KlineSeries:
    def __init__(self, symbol: str, interval: str, history: int = HISTORY) -> None:
        if interval not in KLINE_INTERVALS:
            raise ValueError(f"unknown kline interval {interval!r}")
        self.symbol = symbol
        self.interval = interval
        self.closed: deque[Candle] = deque(maxlen=history)
        self._open: _Open | None = None
        self._last_ts = 0
        self.changed = False

    def add(self, trade: wire.Trade) -> Candle | None:
        """Count a trade; returns the candle it closed, if it opened a new interval."""
        self._last_ts = max(self._last_ts, trade.ts)
        done = None
        candle = self._open
        if candle is not None and self._last_ts > candle.end:
            done = self._close()
            candle = None
        if candle is None:
            candle = self._open = _Open(*bucket(self.interval, self._last_ts), trade.price)
        price, qty = Decimal(trade.price), Decimal(trade.qty)
        if price > Decimal(candle.high):
            candle.high = trade.price
        if price < Decimal(candle.low):
            candle.low = trade.price
        candle.close = trade.price
        candle.volume = EXACT.add(candle.volume, qty)
        candle.quote = EXACT.add(candle.quote, EXACT.multiply(price, qty))
        candle.count += 1
        self.changed = True
        return done

    def close_due(self, now_ms: int) -> Candle | None:
        """The open candle, closed, once the clock has passed its end."""
        if self._open is not None and now_ms > self._open.end:
            return self._close()
        return None

    def current(self) -> Candle | None:
        return self._candle(self._open, closed=False) if self._open is not None else None

    def history(self, limit: int) -> list[Candle]:
        """The last ``limit`` candles, oldest first, the open one last."""
        candles = list(self.closed)
        if self._open is not None:
            candles.append(self._candle(self._open, closed=False))
        return candles[-limit:] if limit > 0 else []

    def _close(self) -> Candle:
        assert self._open is not None
        candle = self._candle(self._open, closed=True)
        self.closed.append(candle)
        self._open = None
        self.changed = False
        return candle

    def _candle(self, c: _Open, *, closed: bool) -> Candle:
        return Candle(
            self.symbol, self.interval, c.start, c.end, c.open, c.high, c.low, c.close,
            text(c.volume), text(c.quote), c.count, closed,
        )  # fmt: skip
