"""The trades stream: the engine's trades merged into one push per window. No I/O.

Every trade the engine sent is in exactly one batch, in the order it arrived (the engine's order:
ingest drops late and duplicate frames before they get here). ``gap`` is set on the first batch
after ingest lost frames of the symbol's source: trades may be missing before that batch, and a
client that keeps a trade history reloads it (``GET /v1/trades``).
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal

import msgspec

from ingest import wire
from pushd.market.decimals import EXACT

RECENT_TRADES = 1000


class TradeItem(msgspec.Struct, frozen=True, gc=False):
    id: int
    price: str
    qty: str
    side: str  # the taker's side
    ts: int


class TradeBatch(msgspec.Struct, frozen=True, omit_defaults=True):
    s: str
    trades: list[TradeItem]
    gap: bool = False


class PricedTrade:
    """A trade with its price, quantity and quote amount parsed once, for every stream."""

    __slots__ = ("id", "price", "price_text", "qty", "quote", "ts")

    def __init__(self, trade: wire.Trade) -> None:
        self.id = trade.id
        self.ts = trade.ts
        self.price_text = trade.price
        self.price = Decimal(trade.price)
        self.qty = Decimal(trade.qty)
        self.quote = EXACT.multiply(self.price, self.qty)


def item(trade: wire.Trade) -> TradeItem:
    return TradeItem(trade.id, trade.price, trade.qty, trade.side, trade.ts)


class TradeMerger:
    def __init__(self, symbol: str, recent: int = RECENT_TRADES) -> None:
        self.symbol = symbol
        self._pending: list[TradeItem] = []
        self._gap = False
        self.recent: deque[TradeItem] = deque(maxlen=recent)  # of the batches flushed so far

    def add(self, trade: wire.Trade) -> None:
        self._pending.append(item(trade))

    def mark_gap(self) -> None:
        """Ingest lost frames: the next batch says so (and goes out even if it is empty)."""
        self._gap = True

    def flush(self) -> TradeBatch | None:
        """The window's batch, or None when there is nothing to say."""
        if not self._pending and not self._gap:
            return None
        batch = TradeBatch(self.symbol, self._pending, gap=self._gap)
        self.recent.extend(self._pending)  # what was pushed, so REST matches the stream's seq
        self._pending, self._gap = [], False
        return batch
