"""The market streams' shell: what it does with the clock and with engine input."""

from __future__ import annotations

from structlog.testing import capture_logs

from ingest import wire
from pushd.bus import MemoryBus, Publisher
from pushd.config import MarketConfig
from pushd.hub import Hub
from pushd.market.kline import bucket
from pushd.markets import FUTURE_TOLERANCE_MS, Markets, wall_ms

DAY_MS = 86_400_000


def test_a_trade_from_a_clock_far_ahead_counts_at_our_time() -> None:
    """One bad engine clock must not freeze the ticker and klines until its time comes."""
    markets = Markets({"BTCUSDT": MarketConfig()}, Publisher(MemoryBus(Hub())), lambda _: None)
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
    assert [t.id for t in market.trades.recent] == [1, 2]  # the trades stream keeps both
