"""The market streams' shell: what it does with the clock and with engine input."""

from __future__ import annotations

from typing import Any

import msgspec
from structlog.testing import capture_logs
from wsproto.frame_protocol import FrameDecoder

from ingest import wire
from pushd.bus import MemoryBus, Publisher
from pushd.channels import Channel
from pushd.config import MarketConfig
from pushd.hub import Hub, Outlet
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
    markets.tick(now)
    assert [t.id for t in market.trades.recent] == [1, 2]  # the trades stream keeps both


def test_new_subscribers_share_one_snapshot_per_seq_and_never_a_stale_one() -> None:
    hub = Hub()
    markets = Markets({"BTCUSDT": MarketConfig()}, Publisher(MemoryBus(hub)), lambda _: None)
    hub.current = markets.current
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
        decoder = FrameDecoder(client=True, extensions=[])
        decoder.receive_bytes(bytes(outlet.out))
        frame = decoder.process_buffer()
        assert frame is not None
        event: dict[str, Any] = msgspec.json.decode(frame.payload)
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
