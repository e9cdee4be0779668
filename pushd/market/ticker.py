"""The rolling 24 h ticker: exact, O(1) amortised per trade. No I/O.

The window holds the trades whose time is after ``now - 24 h``, in arrival order. Trade times
are taken as non-decreasing per symbol (a trade stamped earlier than one already seen counts at
the later time), so the oldest trade is always at the left of the window. Sums (volume, quote
volume = sum of price * qty, count) are added on entry and subtracted on expiry, exactly in
decimals; high and low come from monotonic deques (each trade enters and leaves each deque at
most once). With no trade in the window, open/high/low equal the last price and the sums are 0.
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal

import msgspec

from ingest import wire
from pushd.market.decimals import EXACT, ZERO, quantize, text

WINDOW_MS = 24 * 3600 * 1000


class TickerData(msgspec.Struct, frozen=True, gc=False):
    s: str
    open: str
    high: str
    low: str
    last: str
    volume: str
    quoteVolume: str
    change: str
    changePercent: str
    count: int
    firstId: int | None
    lastId: int
    openTime: int
    closeTime: int


class _Entry:
    __slots__ = ("id", "n", "price", "price_text", "qty", "quote", "ts")

    def __init__(self, n: int, trade: wire.Trade, ts: int) -> None:
        self.n = n
        self.id = trade.id
        self.ts = ts
        self.price_text = trade.price
        self.price = Decimal(trade.price)
        self.qty = Decimal(trade.qty)
        self.quote = EXACT.multiply(self.price, self.qty)


class Ticker:
    def __init__(self, symbol: str, window_ms: int = WINDOW_MS) -> None:
        self.symbol = symbol
        self.window_ms = window_ms
        self._trades: deque[_Entry] = deque()
        self._highs: deque[_Entry] = deque()  # prices strictly decreasing left to right
        self._lows: deque[_Entry] = deque()  # prices strictly increasing
        self._volume = ZERO
        self._quote = ZERO
        self._n = 0
        self._last: _Entry | None = None
        self._last_ts = 0
        self.changed = False

    def add(self, trade: wire.Trade) -> None:
        self._last_ts = max(self._last_ts, trade.ts)
        self._n += 1
        entry = _Entry(self._n, trade, self._last_ts)
        self._trades.append(entry)
        self._volume = EXACT.add(self._volume, entry.qty)
        self._quote = EXACT.add(self._quote, entry.quote)
        while self._highs and self._highs[-1].price <= entry.price:
            self._highs.pop()
        self._highs.append(entry)
        while self._lows and self._lows[-1].price >= entry.price:
            self._lows.pop()
        self._lows.append(entry)
        self._last = entry
        self.changed = True

    def expire(self, now_ms: int) -> None:
        cutoff = now_ms - self.window_ms
        trades = self._trades
        while trades and trades[0].ts <= cutoff:
            gone = trades.popleft()
            self._volume = EXACT.subtract(self._volume, gone.qty)
            self._quote = EXACT.subtract(self._quote, gone.quote)
            if self._highs[0] is gone:
                self._highs.popleft()
            if self._lows[0] is gone:
                self._lows.popleft()
            self.changed = True

    def data(self, now_ms: int) -> TickerData | None:
        """The ticker at ``now_ms`` (expiring what fell out), or None before the first trade."""
        self.expire(now_ms)
        last = self._last
        if last is None:
            return None
        if self._trades:
            first = self._trades[0]
            open_, high, low = first, self._highs[0], self._lows[0]
            first_id: int | None = first.id
        else:
            open_ = high = low = last
            first_id = None
        change = EXACT.subtract(last.price, open_.price)
        percent = ZERO
        if open_.price:
            percent = EXACT.divide(EXACT.multiply(change, Decimal(100)), open_.price)
        return TickerData(
            self.symbol, open_.price_text, high.price_text, low.price_text, last.price_text,
            text(self._volume), text(self._quote), text(change), quantize(percent, 3),
            len(self._trades), first_id, last.id, now_ms - self.window_ms, now_ms,
        )  # fmt: skip
