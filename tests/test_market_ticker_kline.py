"""Ticker and klines against brute-force recomputation; the trade merger loses nothing."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import wire
from pushd.channels import KLINE_INTERVALS
from pushd.config import MarketConfig
from pushd.market.decimals import text
from pushd.market.kline import Candle, Klines, bucket
from pushd.market.symbol import SymbolMarket
from pushd.market.ticker import Ticker, TickerData
from pushd.market.trades import PricedTrade, TradeMerger

HOUR = 3_600_000


@st.composite
def trade_runs(draw: st.DrawFn, max_step: int) -> list[wire.Trade]:
    """Trades with non-decreasing times, prices and quantities of a few decimals."""
    n = draw(st.integers(0, 60))
    ts = draw(st.integers(0, 10**12))
    out = []
    for i in range(n):
        ts += draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(0, max_step)))
        ticks = draw(st.integers(1, 10**6))
        lots = draw(st.integers(1, 10**5))
        px = str(Decimal(ticks).scaleb(-2))
        qty = str(Decimal(lots).scaleb(-3))  # "1.000": kept as written (lastQty)
        side = draw(st.sampled_from(["buy", "sell"]))
        out.append(wire.Trade("BTCUSDT", i + 1, px, qty, side, ts))
    return out


def brute_ticker(trades: list[wire.Trade], now: int) -> tuple[object, ...] | None:
    if not trades:
        return None
    window = [t for t in trades if t.ts // 60_000 >= (now - 24 * HOUR) // 60_000]
    last = trades[-1]
    if not window:
        return (last.price, last.price, last.price, last.price, "0", "0", "0", 0, None, last.qty)
    prices = [Decimal(t.price) for t in window]
    high = max(window, key=lambda t: Decimal(t.price)).price
    low = min(window, key=lambda t: Decimal(t.price)).price
    volume = sum((Decimal(t.qty) for t in window), Decimal(0))
    quote = sum((Decimal(t.price) * Decimal(t.qty) for t in window), Decimal(0))
    change = Decimal(last.price) - prices[0]
    return (
        window[0].price, high, low, last.price, text(volume), text(quote), text(change),
        len(window), window[0].id, last.qty,
    )  # fmt: skip


@settings(max_examples=200)
@given(trade_runs(max_step=6 * HOUR), st.lists(st.integers(0, 30 * HOUR), max_size=5))
def test_ticker_equals_brute_force_at_every_step(
    trades: list[wire.Trade], probes: list[int]
) -> None:
    """After every trade, and at clock times before the next one (the clock only moves on)."""
    ticker = Ticker("BTCUSDT")
    for i, trade in enumerate(trades):
        ticker.add(PricedTrade(trade))
        until = trades[i + 1].ts if i + 1 < len(trades) else None
        times = sorted({trade.ts, *(trade.ts + p for p in probes)})
        for now in [t for t in times if until is None or t <= until]:
            data = ticker.data(now)
            assert data is not None
            got = (
                data.open, data.high, data.low, data.last, data.volume, data.quoteVolume,
                data.change, data.count, data.firstId, data.lastQty,
            )  # fmt: skip
            assert got == brute_ticker(trades[: i + 1], now)


def test_ticker_before_any_trade_is_none_and_change_percent() -> None:
    ticker = Ticker("BTCUSDT")
    assert ticker.data(0) is None
    ticker.add(PricedTrade(wire.Trade("BTCUSDT", 1, "100", "1", "buy", 0)))
    ticker.add(PricedTrade(wire.Trade("BTCUSDT", 2, "90.5", "2", "sell", 1000)))
    data = ticker.data(2000)
    assert data is not None
    assert (data.change, data.changePercent, data.quoteVolume) == ("-9.5", "-9.500", "281")


def brute_klines(trades: list[wire.Trade], interval: str) -> list[tuple[object, ...]]:
    buckets: dict[int, list[wire.Trade]] = {}
    for trade in trades:
        buckets.setdefault(bucket(interval, trade.ts)[0], []).append(trade)
    out = []
    for start, group in sorted(buckets.items()):
        prices = [Decimal(t.price) for t in group]
        out.append((
            start, group[0].price, str(max(prices)), str(min(prices)), group[-1].price,
            text(sum((Decimal(t.qty) for t in group), Decimal(0))),
            text(sum((Decimal(t.price) * Decimal(t.qty) for t in group), Decimal(0))),
            len(group), group[0].id, group[-1].id,
            text(sum((Decimal(t.qty) for t in group if t.side == "buy"), Decimal(0))),
            text(sum((Decimal(t.price) * Decimal(t.qty) for t in group if t.side == "buy"),
                     Decimal(0))),
        ))  # fmt: skip
    return out


@settings(max_examples=150)
@given(trade_runs(max_step=2 * HOUR), st.lists(st.integers(0, 3 * HOUR), max_size=3))
def test_klines_equal_brute_force_bucketing(trades: list[wire.Trade], ticks: list[int]) -> None:
    """Every interval, with the clock ticking between trades (it may close candles first)."""
    klines = Klines("BTCUSDT", history=1000)
    closed_once: list[Candle] = []
    for i, trade in enumerate(trades):
        closed_once += klines.close_due(trade.ts)
        closed_once += klines.add(PricedTrade(trade))
        until = trades[i + 1].ts if i + 1 < len(trades) else None
        for now in sorted(trade.ts + t for t in ticks):
            if until is None or now <= until:
                closed_once += klines.close_due(now)
    for interval in KLINE_INTERVALS:
        candles = klines.history(interval, 1000)
        got = [
            (c.openTime, c.open, c.high, c.low, c.close, c.volume, c.quoteVolume, c.count,
             c.firstId, c.lastId, c.takerBuyVolume, c.takerBuyQuoteVolume)
            for c in candles
        ]  # fmt: skip
        assert got == brute_klines(trades, interval), interval
        mine = [c for c in closed_once if c.i == interval]
        assert all(c.closed for c in mine) and mine == list(klines.closed[interval])
        assert [c for c in candles if c.closed] == mine  # each closed candle returned once
        assert all(not c.closed for c in candles[len(mine) :])


def test_bucket_alignment() -> None:
    ts = calendar.timegm((2026, 11, 25, 13, 47, 12)) * 1000 + 345
    assert bucket("1m", ts) == (ts - 12_345, ts - 12_345 + 59_999)
    monday = calendar.timegm((2026, 11, 23, 0, 0, 0)) * 1000
    assert bucket("1w", ts) == (monday, monday + 7 * 86_400_000 - 1)
    nov, dec = (calendar.timegm((2026, m, 1, 0, 0, 0)) * 1000 for m in (11, 12))
    assert bucket("1M", ts) == (nov, dec - 1)
    dec31 = calendar.timegm((2026, 12, 31, 23, 59, 59)) * 1000
    jan = calendar.timegm((2027, 1, 1, 0, 0, 0)) * 1000
    assert bucket("1M", dec31) == (dec, jan - 1)
    assert datetime.fromtimestamp(bucket("4h", ts)[0] / 1000, UTC).hour == 12


@given(st.lists(st.one_of(st.integers(1, 10**6), st.none()), max_size=200))
def test_trade_merger_loses_and_reorders_nothing(script: list[int | None]) -> None:
    """Integers are trades; None is a window's flush."""
    merger = TradeMerger("BTCUSDT")
    sent, pushed = [], []
    for step in script:
        if step is None:
            batch = merger.flush()
            if batch is not None:
                assert batch.trades  # no empty pushes without a gap to report
                pushed += [t.id for t in batch.trades]
        else:
            merger.add(wire.Trade("BTCUSDT", step, "1", "1", "sell", 0))
            sent.append(step)
    final = merger.flush()
    pushed += [t.id for t in final.trades] if final is not None else []
    assert pushed == sent


def test_gap_marks_the_next_batch() -> None:
    merger = TradeMerger("BTCUSDT")
    merger.mark_gap()
    batch = merger.flush()
    assert batch is not None and batch.gap and batch.trades == []
    assert merger.flush() is None


def test_the_ticker_carries_the_top_of_the_book_and_a_new_top_is_pushed() -> None:
    """The ticker's best bid and ask are the book's at its closeTime (the book is computed
    beside it); a change at the top of the book is a change of the ticker, pushed at the next
    tick even with no trade, and a change below the top is not."""
    market = SymbolMarket("BTCUSDT", MarketConfig(ticker_interval_ms=1000))
    tickers: list[TickerData] = []

    def tick(now: int) -> None:
        market.tick(now)
        for channel, data, _ in market.take():
            if channel == "ticker_BTCUSDT":
                tickers.append(msgspec.json.decode(data, type=TickerData))

    market.trade(wire.Trade("BTCUSDT", 7, "100.5", "0.250", "buy", 1_000))
    tick(1_000)  # no book yet: no level
    assert [(t.lastQty, t.bidPrice, t.bidQty, t.askPrice, t.askQty) for t in tickers] == [
        ("0.250", "0", "0", "0", "0")]  # fmt: skip
    market.book(wire.BookSnapshot("BTCUSDT", 0, 1, [("100", "2"), ("99", "1")], [("101", "3")], 1))
    tick(2_000)  # no trade since: the new top alone makes a push
    assert (tickers[-1].bidPrice, tickers[-1].bidQty, tickers[-1].askPrice,
            tickers[-1].askQty) == ("100", "2", "101", "3")  # fmt: skip
    market.book(wire.BookSnapshot("BTCUSDT", 0, 2, [("100", "2"), ("99", "5")], [("101", "3")], 2))
    tick(3_000)  # a level below the top changed: the ticker did not
    assert len(tickers) == 2
    market.book(wire.BookSnapshot("BTCUSDT", 0, 3, [("100", "2")], [], 3))
    tick(4_000)  # the asks emptied
    assert (len(tickers), tickers[-1].askPrice, tickers[-1].askQty) == (3, "0", "0")
