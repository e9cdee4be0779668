"""Index price, premium index, funding rate and mark price of a perpetual. No I/O, no clock.

Binance's published method, with its parameters per symbol (``FundingConfig``); the formulas are
written out in ``docs/streams.md``. In short, with I the index price:

- I: the median of the spot sources' latest prices, ignoring any older than ``index_stale_ms``.
- impact bid / ask: the average price of selling / buying ``impact_notional`` (quote currency)
  into the book.
- premium index P = (max(0, impact bid - I) - max(0, I - impact ask)) / I, sampled every
  ``premium_sample_ms``; the funding period's average weights the n-th sample by n.
- funding rate F = avg P + clamp(interest - avg P, -clamp, +clamp), then capped to +/- cap.
- price 1 = I * (1 + F * (time to next funding / funding interval));
  price 2 = I + moving average of the basis (mid price - I), sampled each minute over
  ``basis_window_min`` minutes;
  mark price = median(price 1, price 2, last price) (the mean of the first two before any trade).
- estimated settlement price: the mean of the index samples of the last hour.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from decimal import Decimal

import msgspec

from pushd.config import FundingConfig
from pushd.market.decimals import EXACT, ZERO, quantize

HOUR_MS = 3_600_000
MAX_INDEX_SOURCES = 32  # spot sources kept per symbol (an index has a handful)


class MarkPriceData(msgspec.Struct, frozen=True, gc=False):
    s: str
    markPrice: str
    indexPrice: str
    estimatedSettlePrice: str
    fundingRate: str
    premiumIndex: str
    nextFundingTime: int
    T: int


def clamp(value: Decimal, low: Decimal, high: Decimal) -> Decimal:
    return max(low, min(high, value))


def impact_price(levels: Sequence[tuple[str, str]], notional: Decimal) -> Decimal | None:
    """Average price of trading ``notional`` against ``levels`` (best first); None if too thin."""
    remaining, qty = notional, ZERO
    for price_text, qty_text in levels:
        price, level_qty = Decimal(price_text), Decimal(qty_text)
        level_notional = EXACT.multiply(price, level_qty)
        if level_notional >= remaining:
            qty = EXACT.add(qty, EXACT.divide(remaining, price))
            return EXACT.divide(notional, qty)
        remaining = EXACT.subtract(remaining, level_notional)
        qty = EXACT.add(qty, level_qty)
    return None


def premium_index(index: Decimal, impact_bid: Decimal, impact_ask: Decimal) -> Decimal:
    up = max(ZERO, EXACT.subtract(impact_bid, index))
    down = max(ZERO, EXACT.subtract(index, impact_ask))
    return EXACT.divide(EXACT.subtract(up, down), index)


def weighted_premium(samples: Sequence[Decimal]) -> Decimal:
    """The period's average premium: the n-th sample weighs n."""
    if not samples:
        return ZERO
    total = sum((EXACT.multiply(Decimal(n), p) for n, p in enumerate(samples, 1)), ZERO)
    return EXACT.divide(total, Decimal(len(samples) * (len(samples) + 1) // 2))


def funding_rate(avg_premium: Decimal, config: FundingConfig) -> Decimal:
    interest, band, cap = Decimal(config.interest_rate), Decimal(config.clamp), Decimal(config.cap)
    rate = avg_premium + clamp(interest - avg_premium, -band, band)
    return clamp(rate, -cap, cap)


def mark_price(
    index: Decimal, rate: Decimal, to_funding_ms: int, interval_ms: int,
    basis_ma: Decimal, last: Decimal | None,
) -> Decimal:  # fmt: skip
    price1 = index * (1 + rate * Decimal(to_funding_ms) / Decimal(interval_ms))
    price2 = index + basis_ma
    if last is None:
        return (price1 + price2) / 2
    return statistics.median([price1, price2, last])


class WeightedPremium:
    """The period's weighted average premium, kept in O(1) per sample: with n samples,
    sum(k * p_k) grows by n * p_n, and the weights add up to n (n + 1) / 2."""

    __slots__ = ("count", "weighted")

    def __init__(self) -> None:
        self.count = 0
        self.weighted = ZERO

    def add(self, premium: Decimal) -> None:
        self.count += 1
        self.weighted = EXACT.add(self.weighted, EXACT.multiply(Decimal(self.count), premium))

    def average(self) -> Decimal:
        if not self.count:
            return ZERO
        return EXACT.divide(self.weighted, Decimal(self.count * (self.count + 1) // 2))


class RunningMean:
    """The mean of a sliding window of samples, in O(1) per sample (exact running sum)."""

    __slots__ = ("samples", "total")

    def __init__(self, maxlen: int | None = None) -> None:
        self.samples: deque[tuple[int, Decimal]] = deque(maxlen=maxlen)
        self.total = ZERO

    def add(self, at_ms: int, value: Decimal) -> None:
        if self.samples.maxlen is not None and len(self.samples) == self.samples.maxlen:
            self.total = EXACT.subtract(self.total, self.samples[0][1])
        self.samples.append((at_ms, value))
        self.total = EXACT.add(self.total, value)

    def drop_until(self, cutoff_ms: int) -> None:
        """Forget the samples taken at or before ``cutoff_ms``."""
        while self.samples and self.samples[0][0] <= cutoff_ms:
            self.total = EXACT.subtract(self.total, self.samples.popleft()[1])

    def mean(self) -> Decimal | None:
        return self.total / len(self.samples) if self.samples else None


class FundingState:
    """One symbol's funding inputs over time; ``data(now)`` computes the markPrice event.
    Every push costs O(1) in the number of samples: the sums are kept as samples come and go."""

    def __init__(self, symbol: str, config: FundingConfig) -> None:
        self.symbol = symbol
        self.config = config
        self.interval_ms = config.interval_h * HOUR_MS
        self._sources: dict[str, tuple[Decimal, int]] = {}  # source -> (price, ts)
        self._premiums = WeightedPremium()
        self._period = -1
        self._next_premium_ms = 0
        self._basis = RunningMean(maxlen=config.basis_window_min)
        self._next_basis_ms = 0
        self._index_hour = RunningMean()
        self.last_premium = ZERO

    def index_price(self, source: str, price: str, ts: int) -> bool:
        """Take one spot source's price; False (ignored) for a new source beyond
        ``MAX_INDEX_SOURCES`` while all the known ones are fresh: memory stays bounded
        whatever an engine sends."""
        sources = self._sources
        if source not in sources and len(sources) >= MAX_INDEX_SOURCES:
            newest = max(ts, max(t for _p, t in sources.values()))
            for name in [n for n, (_p, t) in sources.items()
                         if newest - t > self.config.index_stale_ms]:  # fmt: skip
                del sources[name]
            if len(sources) >= MAX_INDEX_SOURCES:
                return False
        sources[source] = (Decimal(price), ts)
        return True

    def index(self, now_ms: int) -> Decimal | None:
        fresh = [p for p, ts in self._sources.values() if now_ms - ts <= self.config.index_stale_ms]
        return statistics.median(fresh) if fresh else None

    def next_funding_ms(self, now_ms: int) -> int:
        return (now_ms // self.interval_ms + 1) * self.interval_ms

    def sample(
        self, now_ms: int, bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]]
    ) -> None:
        """Take the premium, basis and index samples that are due at ``now_ms``.

        Called on every tick of the streams' timer: only the funding period's turn is checked
        each time; the index is computed only when a sample is due.
        """
        period = now_ms // self.interval_ms
        if period != self._period:
            self._period, self._premiums = period, WeightedPremium()
        if now_ms < self._next_premium_ms and now_ms < self._next_basis_ms:
            return
        index = self.index(now_ms)
        if index is None or not index:
            return
        if now_ms >= self._next_premium_ms:
            self._next_premium_ms = now_ms + self.config.premium_sample_ms
            notional = Decimal(self.config.impact_notional)
            impact_bid, impact_ask = impact_price(bids, notional), impact_price(asks, notional)
            if impact_bid is not None and impact_ask is not None:
                self.last_premium = premium_index(index, impact_bid, impact_ask)
                self._premiums.add(self.last_premium)
            self._index_hour.add(now_ms, index)
            self._index_hour.drop_until(now_ms - HOUR_MS)
        if now_ms >= self._next_basis_ms and bids and asks:
            self._next_basis_ms = now_ms + 60_000
            mid = (Decimal(bids[0][0]) + Decimal(asks[0][0])) / 2
            self._basis.add(now_ms, mid - index)

    def data(self, now_ms: int, last_price: str | None) -> MarkPriceData | None:
        index = self.index(now_ms)
        if index is None:
            return None
        cfg = self.config
        rate = funding_rate(self._premiums.average(), cfg)
        next_ms = self.next_funding_ms(now_ms)
        basis = self._basis.mean()
        basis = ZERO if basis is None else basis
        last = Decimal(last_price) if last_price is not None else None
        mark = mark_price(index, rate, next_ms - now_ms, self.interval_ms, basis, last)
        settle = self._index_hour.mean()
        settle = index if settle is None else settle
        return MarkPriceData(
            self.symbol,
            quantize(mark, cfg.price_decimals),
            quantize(index, cfg.price_decimals),
            quantize(settle, cfg.price_decimals),
            quantize(rate, cfg.rate_decimals),
            quantize(self.last_premium, cfg.rate_decimals),
            next_ms,
            now_ms,
        )
