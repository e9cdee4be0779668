"""A matching engine that behaves like a market, for demos, tests and load. No I/O, no clock.

``Market.step(now_ms)`` advances the simulation to ``now_ms`` and returns the events it produced:
trades (the crowd's market orders sweeping the book), index prices from several simulated spot
sources, and the demo users' order, balance and position changes. ``Market.book()`` answers a
snapshot request. Everything random comes from one ``random.Random(seed)``: the same seed and the
same sequence of ``step`` times give the same events.

Prices are integers of ticks and quantities integers of lots inside; they leave as exact decimal
strings. The users trade a USDT-margined perpetual: a resting order locks margin
(price * qty / leverage); a fill releases it, charges the maker fee, and moves the position (the
realized PnL of a reducing fill is credited). So for every user, at every moment::

    free + locked == initial + sum(realized pnl) - sum(fees)
    position qty  == sum of signed fills
    order filled  == sum of that order's fills
"""

from __future__ import annotations

import math
import random
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

import msgspec

from ingest import wire

LEVERAGE = Decimal(10)
MAKER_FEE = Decimal("0.0002")
INITIAL_USDT = Decimal(100_000)
MONEY = Decimal("0.00000001")
INDEX_SOURCES = ("spotA", "spotB", "spotC")
INDEX_INTERVAL_MS = 1000
MAX_STEP_S = 1.0
HISTORY_TRADES_PER_S = 0.25  # per symbol, in an average minute of the simulated past
# A past trade stands for the many small ones of a live minute (a day of live trades would be
# millions): it is that much bigger, and the price moves as much as the live one does with its
# sweeps and bursts, so the chart's history and its live candles look alike.
HISTORY_LOTS_SCALE = 100
HISTORY_VOLATILITY_SCALE = 2.5


class SymbolSpec(msgspec.Struct, frozen=True):
    symbol: str
    price: float  # starting price
    price_scale: int  # tick = 10**-price_scale
    qty_scale: int  # lot = 10**-qty_scale
    typical_lots: int  # typical resting quantity at a level, in lots
    volatility: float = 0.0004  # per sqrt(second), relative


DEFAULT_SPECS = (
    SymbolSpec("BTCUSDT", 65_000.0, price_scale=1, qty_scale=3, typical_lots=400),
    SymbolSpec("ETHUSDT", 3_200.0, price_scale=2, qty_scale=2, typical_lots=300),
    SymbolSpec("SOLUSDT", 150.0, price_scale=2, qty_scale=1, typical_lots=200),
)
DEMO_UIDS = ("1001", "1002", "1003", "1004", "1005")


def decimal_str(units: int, scale: int) -> str:
    """Exact decimal text of ``units * 10**-scale``."""
    return plain(Decimal(units).scaleb(-scale))


def money(value: Decimal) -> str:
    return plain(value.quantize(MONEY, rounding=ROUND_HALF_EVEN))


def plain(value: Decimal) -> str:
    """Decimal text without an exponent (``str`` writes a tiny zero as ``0E-8``)."""
    return format(value, "f")


class UserOrder:
    __slots__ = ("filled", "lots", "notional", "order_id", "price", "side", "symbol", "uid")

    def __init__(
        self, uid: str, symbol: str, order_id: int, side: wire.Side, price: int, lots: int
    ) -> None:
        self.uid, self.symbol, self.order_id = uid, symbol, order_id
        self.side, self.price, self.lots = side, price, lots
        self.filled = 0
        self.notional = Decimal(0)  # sum of fill price * qty, for the average price


class Account:
    __slots__ = ("free", "locked", "positions")

    def __init__(self) -> None:
        self.free = INITIAL_USDT
        self.locked = Decimal(0)
        self.positions: dict[str, tuple[Decimal, Decimal, Decimal]] = {}  # qty, entry, realized


class Book:
    """One symbol's book: anonymous liquidity per level plus the demo users' resting orders."""

    def __init__(self, spec: SymbolSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.fair = spec.price * 10**spec.price_scale  # in ticks, a float
        self.anon: dict[wire.Side, dict[int, int]] = {"buy": {}, "sell": {}}
        self.users: dict[wire.Side, dict[int, list[UserOrder]]] = {"buy": {}, "sell": {}}
        self.update_id = 0
        self.trade_id = 0
        self.levels = 300
        self.half_spread = max(1.0, self.fair * 0.00002)
        self.requote()

    def qty(self, side: wire.Side, price: int) -> int:
        return self.anon[side].get(price, 0) + sum(
            o.lots - o.filled for o in self.users[side].get(price, ())
        )

    def best(self, side: wire.Side) -> int | None:
        prices = set(self.anon[side]) | set(self.users[side])
        if not prices:
            return None
        return max(prices) if side == "buy" else min(prices)

    def requote(self) -> None:
        """Market makers re-place their ladders around the fair price, keeping what rests."""
        rng = self.rng
        user_asks, user_bids = self.users["sell"], self.users["buy"]
        top_bid = math.floor(self.fair - self.half_spread)
        if user_asks:
            top_bid = min(top_bid, min(user_asks) - 1)
        low_ask = math.ceil(self.fair + self.half_spread)
        if user_bids:
            low_ask = max(low_ask, max(user_bids) + 1)
        low_ask = max(low_ask, top_bid + 1)
        for side, start, step in (("buy", top_bid, -1), ("sell", low_ask, 1)):
            ladder = self.anon[side]  # type: ignore[index]
            keep = {start + step * i for i in range(self.levels)}
            for price in [p for p in ladder if p not in keep]:
                del ladder[price]
            for price in keep:
                if price not in ladder:
                    if rng.random() < 0.85:
                        ladder[price] = self._level_lots()
                elif rng.random() < 0.05:
                    ladder[price] = max(1, int(ladder[price] * rng.uniform(0.5, 1.6)))
        self.update_id += 1

    def trade(self, price: int, lots: int, side: wire.Side, ts: int) -> wire.Trade:
        """The next trade of this symbol (ids rise by one), at ``price`` ticks for ``lots``."""
        self.trade_id += 1
        spec = self.spec
        return wire.Trade(
            spec.symbol,
            self.trade_id,
            decimal_str(price, spec.price_scale),
            decimal_str(lots, spec.qty_scale),
            side,
            ts,
        )

    def _level_lots(self) -> int:
        return max(1, int(self.rng.lognormvariate(0, 0.8) * self.spec.typical_lots))

    def snapshot(self, depth: int, request_id: int, now_ms: int) -> wire.BookSnapshot:
        spec = self.spec
        out: dict[str, list[wire.Level]] = {}
        for side, reverse in (("buy", True), ("sell", False)):
            prices = sorted(set(self.anon[side]) | set(self.users[side]), reverse=reverse)  # type: ignore[index]
            out[side] = [
                (decimal_str(p, spec.price_scale), decimal_str(q, spec.qty_scale))
                for p in prices[:depth]
                if (q := self.qty(side, p)) > 0  # type: ignore[arg-type]
            ]
        return wire.BookSnapshot(
            spec.symbol, request_id, self.update_id, out["buy"], out["sell"], now_ms
        )


class Market:
    def __init__(
        self,
        seed: int = 1,
        rate: float = 1.0,
        specs: tuple[SymbolSpec, ...] = DEFAULT_SPECS,
        uids: tuple[str, ...] = DEMO_UIDS,
        start_ms: int = 0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.rate = rate
        self.books = {spec.symbol: Book(spec, self.rng) for spec in specs}
        self.accounts = {uid: Account() for uid in uids}
        self.orders: dict[int, UserOrder] = {}
        self._order_ids = 0
        self.now_ms = start_ms
        self._next_index_ms = start_ms
        self._burst_until = start_ms
        self._source_bias = {s: self.rng.uniform(-0.0002, 0.0002) for s in INDEX_SOURCES}
        self.market_events: list[wire.Event] = []
        self.private_events: list[wire.Event] = []
        self.halted = False

    # -- driving ---------------------------------------------------------------------------

    def step(self, now_ms: int) -> tuple[list[wire.Event], list[wire.Event]]:
        """Advance to ``now_ms``; returns (market events, private events) in engine order.

        One step simulates at most ``MAX_STEP_S`` of activity: the first step on a wall clock,
        or one after a pause, does not replay the whole time since the last.
        """
        dt = min(MAX_STEP_S, max(0, now_ms - self.now_ms) / 1000)
        self.now_ms = now_ms
        self.market_events, self.private_events = [], []
        if self.halted:
            return self.market_events, self.private_events
        rng = self.rng
        if now_ms >= self._burst_until and rng.random() < dt * 0.2:
            self._burst_until = now_ms + int(rng.uniform(500, 3000))  # a burst of activity
        burst = 6.0 if now_ms < self._burst_until else 1.0
        for book in self.books.values():
            spec = book.spec
            book.fair *= math.exp(spec.volatility * burst * math.sqrt(dt) * rng.gauss(0, 1))
            book.requote()
            for _ in range(self._poisson(20.0 * self.rate * burst * dt)):
                self._market_order(book)
        for uid in self.accounts:
            if rng.random() < dt * 2.0:
                self._user_places(uid, rng.choice(list(self.books.values())))
        for order in list(self.orders.values()):
            if rng.random() < dt * 0.1:
                self._cancel(order)
        if now_ms >= self._next_index_ms:
            self._next_index_ms = now_ms + INDEX_INTERVAL_MS
            self._index_prices()
        return self.market_events, self.private_events

    def halt(self) -> None:
        """Trading stops: later steps move nothing and return no events. A feed halted so
        has sent every event of its last step (its task is not cancelled in the middle of a
        step's sends), so what the market stands at is what the engine told."""
        self.halted = True

    def book(self, symbol: str, depth: int, request_id: int) -> wire.BookSnapshot:
        return self.books[symbol].snapshot(depth, request_id, self.now_ms)

    def history(self, span_ms: int, end_ms: int) -> list[wire.Trade]:
        """The market's past: ``span_ms`` of trades per symbol before ``end_ms``, oldest first.

        A demo opens on a market with a day behind it (ticker, every candle interval). The
        price walks back from each book's fair price, so the past ends where the live market
        stands, and the live trade ids go on from it. It is drawn from a generator of its own
        (seeded by the market's seed): a seed's live events are the same with or without it.
        """
        rng = random.Random(f"history-{self.seed}")
        seconds = max(0, span_ms // 1000)
        start_ms = end_ms - seconds * 1000
        trades: list[wire.Trade] = []
        for book in self.books.values():
            spec = book.spec
            fair = [0.0] * seconds  # in ticks, one per second, walked back from now
            price = book.fair
            for i in range(seconds - 1, -1, -1):
                fair[i] = price
                price *= math.exp(spec.volatility * HISTORY_VOLATILITY_SCALE * rng.gauss(0, 1))
            activity = 1.0
            for i, mid in enumerate(fair):
                if i % 60 == 0:  # busy and quiet minutes: volume bars with a shape
                    activity = rng.lognormvariate(-0.3, 0.8)
                if rng.random() >= HISTORY_TRADES_PER_S * activity:
                    continue
                for offset in sorted(rng.randrange(1000) for _ in range(1 + int(activity))):
                    side: wire.Side = "buy" if rng.random() < 0.5 else "sell"
                    half = book.half_spread  # the makers' spread, as in the live book
                    ticks = math.ceil(mid + half) if side == "buy" else math.floor(mid - half)
                    size = rng.lognormvariate(0, 1.2) * spec.typical_lots * 0.3 * HISTORY_LOTS_SCALE
                    lots = max(1, int(size))
                    trades.append(book.trade(ticks, lots, side, start_ms + i * 1000 + offset))
        trades.sort(key=lambda trade: trade.ts)  # stable: each symbol's ids stay in order
        return trades

    def _poisson(self, mean: float) -> int:
        if mean <= 0:
            return 0
        if mean > 50:  # normal approximation, fast for load tests
            return max(0, round(self.rng.gauss(mean, math.sqrt(mean))))
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    # -- the crowd -------------------------------------------------------------------------

    def _market_order(self, book: Book) -> None:
        rng = self.rng
        side: wire.Side = "buy" if rng.random() < 0.5 else "sell"
        maker: wire.Side = "sell" if side == "buy" else "buy"
        remaining = max(1, int(rng.lognormvariate(0, 1.2) * book.spec.typical_lots * 0.3))
        while remaining > 0:
            price = book.best(maker)
            if price is None:
                break
            for order in list(book.users[maker].get(price, ())):
                take = min(remaining, order.lots - order.filled)
                self._trade(book, price, take, side)
                self._fill(order, take)
                remaining -= take
                if remaining == 0:
                    break
            anon = book.anon[maker].get(price, 0)
            if remaining > 0 and anon > 0:
                take = min(remaining, anon)
                self._trade(book, price, take, side)
                remaining -= take
                if anon == take:
                    del book.anon[maker][price]
                else:
                    book.anon[maker][price] = anon - take
            elif remaining > 0 and price not in book.users[maker]:
                book.anon[maker].pop(price, None)
        last = book.best(maker)
        if last is not None:  # the sweep moved the price: makers re-centre on it
            book.fair = 0.7 * book.fair + 0.3 * last
        book.update_id += 1

    def _trade(self, book: Book, price: int, lots: int, side: wire.Side) -> None:
        self.market_events.append(book.trade(price, lots, side, self.now_ms))

    def _index_prices(self) -> None:
        for book in self.books.values():
            spec = book.spec
            for source, bias in self._source_bias.items():
                ticks = round(book.fair * (1 + bias + self.rng.gauss(0, 0.0001)))
                self.market_events.append(
                    wire.IndexPrice(
                        spec.symbol, source, decimal_str(ticks, spec.price_scale), self.now_ms
                    )
                )

    # -- the demo users ----------------------------------------------------------------------

    def _user_places(self, uid: str, book: Book) -> None:
        rng = self.rng
        side: wire.Side = "buy" if rng.random() < 0.5 else "sell"
        best = book.best(side)
        if best is None:
            return
        price = best - rng.randint(0, 3) if side == "buy" else best + rng.randint(0, 3)
        lots = max(1, int(book.spec.typical_lots * rng.uniform(0.05, 0.5)))
        margin = self._margin(book.spec, price, lots)
        account = self.accounts[uid]
        if margin > account.free:
            return
        self._order_ids += 1
        order = UserOrder(uid, book.spec.symbol, self._order_ids, side, price, lots)
        self.orders[order.order_id] = order
        book.users[side].setdefault(price, []).append(order)
        book.update_id += 1
        account.free -= margin
        account.locked += margin
        self._order_event(order, "new")
        self._balance_event(uid, "order")

    def _cancel(self, order: UserOrder) -> None:
        book = self.books[order.symbol]
        resting = book.users[order.side][order.price]
        resting.remove(order)
        if not resting:
            del book.users[order.side][order.price]
        book.update_id += 1
        del self.orders[order.order_id]
        margin = self._margin(book.spec, order.price, order.lots - order.filled)
        account = self.accounts[order.uid]
        account.locked -= margin
        account.free += margin
        self._order_event(order, "canceled")
        self._balance_event(order.uid, "cancel")

    def _fill(self, order: UserOrder, lots: int) -> None:
        book = self.books[order.symbol]
        spec = book.spec
        price = Decimal(order.price).scaleb(-spec.price_scale)
        qty = Decimal(lots).scaleb(-spec.qty_scale)
        order.filled += lots
        order.notional += price * qty
        fee = (price * qty * MAKER_FEE).quantize(MONEY, rounding=ROUND_HALF_EVEN)
        account = self.accounts[order.uid]
        margin = self._margin(spec, order.price, lots)
        account.locked -= margin
        account.free += margin - fee
        signed = qty if order.side == "buy" else -qty
        pos_qty, entry, realized = account.positions.get(order.symbol, (Decimal(0),) * 3)
        realized_now = Decimal(0)
        if pos_qty == 0 or (pos_qty > 0) == (signed > 0):  # opening or adding
            total = pos_qty + signed
            entry = ((entry * abs(pos_qty) + price * qty) / abs(total)).quantize(
                Decimal(1).scaleb(-spec.price_scale - 4), rounding=ROUND_HALF_EVEN
            )
            pos_qty = total
        else:  # reducing, maybe flipping
            closed = min(abs(pos_qty), qty)
            direction = 1 if pos_qty > 0 else -1
            realized_now = (price - entry) * closed * direction
            pos_qty += signed
            if pos_qty == 0:
                entry = Decimal(0)
            elif (pos_qty > 0) != (direction > 0):  # flipped: the rest opens at this price
                entry = price
        account.free += realized_now
        account.positions[order.symbol] = (pos_qty, entry, realized + realized_now)
        done = order.filled == order.lots
        if done:
            book.users[order.side][order.price].remove(order)
            if not book.users[order.side][order.price]:
                del book.users[order.side][order.price]
            del self.orders[order.order_id]
        self._order_event(order, "filled" if done else "partially_filled", lots=lots, fee=fee)
        self._balance_event(order.uid, "fill")
        self.private_events.append(
            wire.PositionUpdate(
                order.uid,
                order.symbol,
                plain(pos_qty),
                plain(entry),
                money(realized + realized_now),
                self.now_ms,
            )
        )

    @staticmethod
    def _margin(spec: SymbolSpec, price: int, lots: int) -> Decimal:
        return (
            Decimal(price).scaleb(-spec.price_scale)
            * Decimal(lots).scaleb(-spec.qty_scale)
            / (LEVERAGE)
        )

    def _order_event(
        self,
        order: UserOrder,
        status: Literal["new", "partially_filled", "filled", "canceled"],
        lots: int = 0,
        fee: Decimal = Decimal(0),
    ) -> None:
        spec = self.books[order.symbol].spec
        filled = Decimal(order.filled).scaleb(-spec.qty_scale)
        avg = (
            (order.notional / filled).quantize(Decimal(1).scaleb(-spec.price_scale - 4))
            if (filled)
            else Decimal(0)
        )
        self.private_events.append(
            wire.OrderUpdate(
                uid=order.uid,
                symbol=order.symbol,
                order_id=order.order_id,
                side=order.side,
                kind="limit",
                price=decimal_str(order.price, spec.price_scale),
                qty=decimal_str(order.lots, spec.qty_scale),
                filled_qty=plain(filled),
                avg_price=plain(avg),
                status=status,
                ts=self.now_ms,
                last_fill_qty=decimal_str(lots, spec.qty_scale),
                last_fill_price=decimal_str(order.price if lots else 0, spec.price_scale),
                fee=money(fee),
            )
        )

    def _balance_event(self, uid: str, reason: Literal["order", "fill", "cancel"]) -> None:
        account = self.accounts[uid]
        self.private_events.append(
            wire.BalanceUpdate(
                uid, "USDT", money(account.free), money(account.locked), reason, self.now_ms
            )
        )
