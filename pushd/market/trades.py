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
# trades kept for a hand-over: a node that starts publishing (a standby taking over, a leader
# back after an outage) publishes those computed after the last one Redis has; it needs the
# seconds since the leader's last publish, so those older than a minute (engine time) go too
UNPUBLISHED_TRADES = 20_000
UNPUBLISHED_MS = 60_000


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

    __slots__ = ("id", "price", "price_text", "qty", "qty_text", "quote", "taker_buy", "ts")

    def __init__(self, trade: wire.Trade) -> None:
        self.id = trade.id
        self.ts = trade.ts
        self.price_text = trade.price
        self.price = Decimal(trade.price)
        self.qty_text = trade.qty
        self.qty = Decimal(trade.qty)
        self.quote = EXACT.multiply(self.price, self.qty)
        self.taker_buy = trade.side == "buy"  # the taker bought (candles' taker-buy volumes)


def item(trade: wire.Trade) -> TradeItem:
    return TradeItem(trade.id, trade.price, trade.qty, trade.side, trade.ts)


class TradeMerger:
    def __init__(self, symbol: str, recent: int = RECENT_TRADES) -> None:
        self.symbol = symbol
        self._pending: list[TradeItem] = []
        self._gap = False
        self.recent: deque[TradeItem] = deque(maxlen=recent)  # of the batches flushed so far
        # of the batches flushed and not published (this node did not lead): a hand-over's
        self.unpublished: deque[TradeItem] = deque(maxlen=UNPUBLISHED_TRADES)
        self.last_published: int | None = None  # id of the last trade this node published

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

    def published(self, batch: TradeBatch) -> None:
        """``batch`` (flushed) went to the bus."""
        if batch.trades:
            self.last_published = batch.trades[-1].id

    def withheld(self, batch: TradeBatch) -> None:
        """``batch`` (flushed) was not published: this node does not lead the symbol now."""
        kept = self.unpublished
        kept.extend(batch.trades)
        if kept:
            oldest = kept[-1].ts - UNPUBLISHED_MS
            while kept[0].ts < oldest:
                kept.popleft()

    def hand_over(self, last_id: int | None) -> TradeBatch | None:
        """The batch a node that starts publishing sends: the trades it computed and did not
        publish, after ``last_id`` (the last trade on the tape, None: unknown) and after the
        last it published itself. ``gap`` unless the batch provably continues the tape: it
        starts at or before the trade after the last known one (ids rise by one)."""
        known = max((i for i in (last_id, self.last_published) if i is not None), default=None)
        trades = [t for t in self.unpublished if known is None or t.id > known]
        continuous = known is not None and (
            not self.unpublished or self.unpublished[0].id <= known + 1
        )
        self.unpublished.clear()
        if not trades and continuous:
            return None
        batch = TradeBatch(self.symbol, trades, gap=not continuous)
        self.published(batch)
        return batch
