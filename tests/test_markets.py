"""The market streams' shell: what it does with the clock and with engine input."""

from __future__ import annotations

from typing import Any

import msgspec
from structlog.testing import capture_logs
from upstream import Upstream
from wsframes import frames

from ingest import wire
from pushd.bus.memory import MemoryBus
from pushd.channels import Channel
from pushd.config import MarketConfig
from pushd.gateway.hub import Hub, Outlet
from pushd.market.kline import bucket
from pushd.market.markets import FUTURE_TOLERANCE_MS, Markets, wall_ms

DAY_MS = 86_400_000


def test_a_trade_from_a_clock_far_ahead_counts_at_our_time() -> None:
    """One bad engine clock must not freeze the ticker and klines until its time comes."""
    markets = Markets({"BTCUSDT": MarketConfig()}, MemoryBus(Hub(), 200, 300.0), lambda _: None)
    now = wall_ms()
    with capture_logs() as logs:
        markets.trade(wire.Trade("BTCUSDT", 1, "100", "1", "buy", now + DAY_MS))
        markets.trade(wire.Trade("BTCUSDT", 2, "101", "1", "buy", now))
    assert markets.future_trades == 1
    assert [e["event"] for e in logs] == ["trade stamped in the future: counted at our time"]
    market = markets.symbols["BTCUSDT"]
    candle = market.klines.current("1h")  # both trades in this hour, not the bad clock's
    assert candle is not None and candle.count == 2
    assert candle.openTime == bucket("1h", now)[0]
    # a day later both trades have left the 24 h window: it was not pinned to the bad time
    ticker = market.ticker.data(now + DAY_MS + FUTURE_TOLERANCE_MS)
    assert ticker is not None and ticker.count == 0
    markets.tick(now)
    assert [t.id for t in market.trades.recent] == [1, 2]  # the trades stream keeps both


def test_new_subscribers_share_one_snapshot_per_seq_and_never_a_stale_one() -> None:
    hub = Hub()
    markets = Markets({"BTCUSDT": MarketConfig()}, MemoryBus(hub, 200, 300.0), lambda _: None)
    hub.attach(Upstream(markets.current))
    market = markets.symbols["BTCUSDT"]
    encodes = 0
    real_current = market.current

    def counting(internal: str, *, stale: bool = False) -> bytes | None:
        nonlocal encodes
        encodes += 1
        return real_current(internal, stale=stale)

    market.current = counting  # type: ignore[method-assign]
    depth = Channel("depth_BTCUSDT", "BTCUSDT@depth", private=False, symbol="BTCUSDT")

    def first_event(outlet: Outlet) -> dict[str, Any]:
        event: dict[str, Any] = msgspec.json.decode(frames(bytes(outlet.out))[0][1])
        return event

    markets.book(wire.BookSnapshot("BTCUSDT", 0, 7, [("10", "1")], [("11", "2")], 0))
    a, b = Outlet(1 << 16), Outlet(1 << 16)
    hub.subscribe(a, depth)
    hub.subscribe(b, depth)
    assert encodes == 1  # two subscribers, one snapshot
    assert bytes(a.out) == bytes(b.out)
    assert (first_event(a)["seq"], first_event(a)["data"]["u"]) == (1, 7)
    markets.book(wire.BookSnapshot("BTCUSDT", 0, 9, [("10", "3")], [("11", "2")], 0))
    c = Outlet(1 << 16)
    hub.subscribe(c, depth)
    assert encodes == 2
    event = first_event(c)
    assert (event["seq"], event["data"]["u"], event["data"]["bids"]) == (2, 9, [["10", "3"]])


def minute_markets() -> tuple[Markets, Hub]:
    hub = Hub()
    markets = Markets({"BTCUSDT": MarketConfig()}, MemoryBus(hub, 200, 300.0), lambda _: None)
    return markets, hub


def test_a_late_trade_never_reopens_a_closed_candle() -> None:
    """The timer closed the minute; a trade stamped inside it arrives after: it counts in the
    open minute, and the closed candle stays the only one with its openTime."""
    markets, _ = minute_markets()
    market = markets.symbols["BTCUSDT"]
    minute = (wall_ms() // 60_000 - 5) * 60_000  # a past minute, so the timer closes it
    markets.tick(minute + 10)
    markets.trade(wire.Trade("BTCUSDT", 1, "100", "1", "buy", minute + 59_990))
    markets.tick(minute + 60_050)  # the clock passes the minute's end: it closes
    markets.trade(wire.Trade("BTCUSDT", 2, "101", "1", "buy", minute + 59_999))  # late
    markets.tick(minute + 120_100)
    history = market.klines.history("1m", 10)
    assert [c.openTime for c in history] == [minute, minute + 60_000]
    assert [(c.count, c.closed) for c in history] == [(1, True), (1, True)]
    assert market.late_trades == 1
    ticker = market.ticker.data(minute + 120_100)
    assert ticker is not None and ticker.count == 2  # the ticker counts it once, too


def test_rest_trades_stand_exactly_at_their_seq() -> None:
    """Trades still in the merge window are not in the snapshot: they come in event seq+1."""
    markets, _ = minute_markets()
    market = markets.symbols["BTCUSDT"]
    now = wall_ms()
    markets.trade(wire.Trade("BTCUSDT", 1, "100", "1", "buy", now))
    markets.tick(now)
    seq = markets._bus.position("trades_BTCUSDT").seq
    markets.trade(wire.Trade("BTCUSDT", 2, "100", "1", "buy", now))  # pending
    assert [t.id for t in market.trades.recent] == [1]
    assert markets._bus.position("trades_BTCUSDT").seq == seq
    markets.tick(now + 200)
    assert [t.id for t in market.trades.recent] == [1, 2]
    assert markets._bus.position("trades_BTCUSDT").seq == seq + 1


def test_ticker_memory_is_bounded_by_time_not_trades() -> None:
    market = minute_markets()[0].symbols["BTCUSDT"]
    start = (wall_ms() // 60_000 - 3000) * 60_000
    for i in range(30_000):  # 30,000 trades over 50 hours: 6 s apart
        market.trade(wire.Trade("BTCUSDT", i, "100", "1", "buy", start + i * 6000))
    assert len(market.ticker._window) <= 24 * 60 + 1
    data = market.ticker.data(start + 30_000 * 6000)
    assert data is not None and data.openTime % 60_000 == 0
    assert data.count == sum(1 for i in range(30_000) if start + i * 6000 >= data.openTime)


def test_one_symbols_fault_stops_neither_the_timer_nor_the_others() -> None:
    hub = Hub()
    markets = Markets(
        {"BTCUSDT": MarketConfig(), "ETHUSDT": MarketConfig()},
        MemoryBus(hub, 200, 300.0),
        lambda _: None,
    )

    def broken(now_ms: int) -> None:
        raise ZeroDivisionError("a bug in one symbol's maths")

    markets.symbols["BTCUSDT"].tick = broken  # type: ignore[method-assign]
    now = wall_ms()
    markets.trade(wire.Trade("ETHUSDT", 1, "100", "1", "buy", now))
    with capture_logs() as logs:
        markets.tick(now)
    assert markets.failures == 1
    assert [e["event"] for e in logs] == ["market tick failed"]
    assert markets._bus.position("trades_ETHUSDT").seq == 1  # the other symbol went on


def test_a_replayed_past_fills_the_ticker_and_candles_without_a_push() -> None:
    """The engine's past (the demo's simulated day) is counted before serving: the ticker and
    every candle interval have a day behind them, and none of it was pushed on a channel."""
    from ingest.sim import Market

    bus = MemoryBus(Hub(), 200, 300.0)
    markets = Markets({"BTCUSDT": MarketConfig()}, bus, lambda _: None)
    now = wall_ms()
    past = [t for t in Market(seed=2).history(DAY_MS, now) if t.symbol == "BTCUSDT"]
    markets.replay(past)
    market = markets.symbols["BTCUSDT"]
    pushed = {channel: bus.position(channel) for channel in market.channel_names()}
    assert all(at is None or at.seq == 0 for at in pushed.values())  # not one event anywhere
    minutes = market.klines_history("1m", 1000)
    assert len(minutes) == 500  # the closed ones kept; the open one comes with the first push
    assert all(c.closed for c in minutes)
    assert minutes[-1].closeTime < bucket("1m", past[-1].ts)[0]  # the open minute is not closed
    assert 24 <= len(market.klines_history("1h", 1000)) <= 25
    assert [t.id for t in market.trades.recent] == [t.id for t in past[-1000:]]
    markets.tick(now)  # the first tick pushes the day's ticker and the open candles
    ticker = market.ticker.data(now)
    assert ticker is not None and ticker.count == len(past) and ticker.lastId == past[-1].id
    at = bus.position("ticker_BTCUSDT")
    assert at is not None and at.seq == 1
    hours = market.klines_history("1h", 1000)
    assert sum(c.count for c in hours) == len(past)  # the open hour as pushed by the tick
    assert markets.trades == 0  # replayed trades are not live ones (metrics, rates)
