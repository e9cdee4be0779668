"""The rolling 24 h ticker: exact, O(1) amortised per trade, memory bounded by time. No I/O.

The window, as Binance defines its rolling-window ticker: it opens at the start of the minute
that holds ``now - 24 h`` (``openTime``, always on a minute) and closes at ``now``; so it is up to
59,999 ms wider than 24 h. It holds exactly the trades whose time is in it. Trade times are
taken as non-decreasing per symbol (a trade stamped earlier than one already seen counts at the
later time), so the oldest trade is always at the left of the window. Trades of the same minute
share one entry (they enter and leave the window together), so a symbol's ticker holds at most
1,441 entries, however many trades it has. Sums (volume, quote volume = sum of price * qty,
count) are added on entry and subtracted on expiry, exactly in decimals; high and low come from
monotonic deques (each entry enters and leaves each deque at most once). With no trade in the
window, open/high/low equal the last price and the sums are 0.

The ticker also says the latest trade's quantity and the top of the book (best bid and ask,
price and quantity) as of its ``closeTime``: the caller hands the book's best levels in, since
the book is computed beside the ticker (``pushd.market.symbol``), and a change at the top of
the book is a change of the ticker (it is pushed at the next tick).
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal

import msgspec

from pushd.market.decimals import EXACT, ZERO, quantize, text
from pushd.market.depth import Level
from pushd.market.trades import PricedTrade

WINDOW_MS = 24 * 3600 * 1000
BUCKET_MS = 60_000  # the window moves by whole minutes


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
    # added after the first release (defaults: a ticker stored by an older pushd still reads)
    lastQty: str = "0"  # the latest trade's quantity
    # the top of the book at closeTime (the book after the last depth event); "0": no level
    bidPrice: str = "0"
    bidQty: str = "0"
    askPrice: str = "0"
    askQty: str = "0"


NO_LEVEL = ("0", "0")


class _Bucket:
    """The trades of one minute: they enter and leave the window together."""

    __slots__ = ("count", "first", "high", "key", "low", "qty", "quote")

    def __init__(self, trade: PricedTrade, key: int) -> None:
        self.key = key  # the minute: time // BUCKET_MS
        self.first = self.high = self.low = trade
        self.qty = trade.qty
        self.quote = trade.quote
        self.count = 1


class Ticker:
    def __init__(self, symbol: str, window_ms: int = WINDOW_MS) -> None:
        self.symbol = symbol
        self.window_ms = window_ms
        self._window: deque[_Bucket] = deque()
        self._highs: deque[_Bucket] = deque()  # highs strictly decreasing left to right
        self._lows: deque[_Bucket] = deque()  # lows strictly increasing
        self._volume = ZERO
        self._quote = ZERO
        self._count = 0
        self._last: PricedTrade | None = None
        self._last_ts = 0
        self.changed = False

    def add(self, trade: PricedTrade) -> None:
        self._last_ts = max(self._last_ts, trade.ts)
        key = self._last_ts // BUCKET_MS
        window = self._window
        if window and window[-1].key == key:
            ms = window[-1]  # the newest entry: rightmost in both monotonic deques
            ms.qty = EXACT.add(ms.qty, trade.qty)
            ms.quote = EXACT.add(ms.quote, trade.quote)
            ms.count += 1
            if trade.price > ms.high.price:
                ms.high = trade
                self._highs.pop()
                self._push_high(ms)
            elif trade.price < ms.low.price:
                ms.low = trade
                self._lows.pop()
                self._push_low(ms)
        else:
            ms = _Bucket(trade, key)
            window.append(ms)
            self._push_high(ms)
            self._push_low(ms)
        self._volume = EXACT.add(self._volume, trade.qty)
        self._quote = EXACT.add(self._quote, trade.quote)
        self._count += 1
        self._last = trade
        self.changed = True
        self.expire(self._last_ts)  # the window is bounded by time even between timer ticks

    def _push_high(self, ms: _Bucket) -> None:
        highs = self._highs
        while highs and highs[-1].high.price <= ms.high.price:
            highs.pop()
        highs.append(ms)

    def _push_low(self, ms: _Bucket) -> None:
        lows = self._lows
        while lows and lows[-1].low.price >= ms.low.price:
            lows.pop()
        lows.append(ms)

    def open_time(self, now_ms: int) -> int:
        """Where the window that closes at ``now_ms`` opens: the minute of ``now - 24 h``."""
        return (now_ms - self.window_ms) // BUCKET_MS * BUCKET_MS

    def expire(self, now_ms: int) -> None:
        first_key = (now_ms - self.window_ms) // BUCKET_MS
        window = self._window
        while window and window[0].key < first_key:
            gone = window.popleft()
            self._volume = EXACT.subtract(self._volume, gone.qty)
            self._quote = EXACT.subtract(self._quote, gone.quote)
            self._count -= gone.count
            if self._highs[0] is gone:
                self._highs.popleft()
            if self._lows[0] is gone:
                self._lows.popleft()
            self.changed = True

    def data(
        self, now_ms: int, bid: Level | None = None, ask: Level | None = None
    ) -> TickerData | None:
        """The ticker at ``now_ms`` (expiring what fell out), or None before the first trade;
        ``bid`` and ``ask``: the best level of each side of the book now (None: no level)."""
        self.expire(now_ms)
        last = self._last
        if last is None:
            return None
        if self._window:
            open_ = self._window[0].first
            high, low = self._highs[0].high, self._lows[0].low
            first_id: int | None = open_.id
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
            self._count, first_id, last.id, self.open_time(now_ms), now_ms, last.qty_text,
            *(bid or NO_LEVEL), *(ask or NO_LEVEL),
        )  # fmt: skip
