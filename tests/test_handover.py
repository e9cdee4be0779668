"""A compute node that starts publishing (a standby taking over, a leader back after a Redis
outage): what it publishes then, tested on the sans-IO parts (issue 19, items 2 and 3).
tests/test_faults.py runs the same against real nodes, Redis and the simulated engine."""

from __future__ import annotations

import msgspec
from conftest import order

from ingest import wire
from pushd.bus.memory import MemoryBus
from pushd.bus.model import Position
from pushd.config import MarketConfig
from pushd.feed.routing import EngineRouter
from pushd.gateway.hub import Hub
from pushd.market.markets import Markets
from pushd.market.symbol import SymbolMarket
from pushd.market.trades import TradeBatch, TradeMerger


def trades(merger: TradeMerger, ids: range) -> TradeBatch:
    for trade_id in ids:
        merger.add(wire.Trade("BTCUSDT", trade_id, "1", "1", "buy", 0))
    batch = merger.flush()
    assert batch is not None
    return batch


def test_a_standby_publishes_the_trades_after_the_last_one_on_the_tape() -> None:
    merger = TradeMerger("BTCUSDT")
    merger.withheld(trades(merger, range(1, 11)))  # computed, another node published
    batch = merger.hand_over(6)
    assert batch is not None and [t.id for t in batch.trades] == [7, 8, 9, 10]
    assert not batch.gap  # it holds the trade after the last one: the tape goes on whole
    assert merger.hand_over(10) is None  # nothing more to say


def test_a_hand_over_that_cannot_prove_the_tape_whole_says_gap() -> None:
    merger = TradeMerger("BTCUSDT")
    merger.withheld(trades(merger, range(5, 9)))  # it started (or kept) from trade 5 only
    batch = merger.hand_over(2)  # trades 3 and 4: nobody here computed them
    assert batch is not None and batch.gap and [t.id for t in batch.trades] == [5, 6, 7, 8]
    merger.withheld(trades(merger, range(9, 11)))
    batch = merger.hand_over(None)  # the tape is gone (Redis restarted empty): from its own
    assert batch is not None and not batch.gap and [t.id for t in batch.trades] == [9, 10]
    fresh = TradeMerger("BTCUSDT")
    fresh.withheld(trades(fresh, range(9, 11)))
    batch = fresh.hand_over(None)  # the tape is gone, and this node never published
    assert batch is not None and batch.gap and [t.id for t in batch.trades] == [9, 10]


def test_a_leader_back_after_an_outage_publishes_what_it_kept() -> None:
    merger = TradeMerger("BTCUSDT")
    merger.published(trades(merger, range(1, 5)))  # led: went to the bus
    merger.withheld(trades(merger, range(5, 9)))  # its lease lapsed: kept
    batch = merger.hand_over(None)  # Redis restarted empty: it knows what it published
    assert batch is not None and not batch.gap and [t.id for t in batch.trades] == [5, 6, 7, 8]


def test_taking_over_publishes_every_state_stream_whole() -> None:
    market = SymbolMarket("BTCUSDT", MarketConfig())
    market.trade(wire.Trade("BTCUSDT", 1, "100", "1", "buy", 1_700_000_000_000))
    market.tick(1_700_000_000_500)
    market.tick(1_700_000_061_000)  # the minute closed: its candle is the kline's last state
    market.take(published=False)
    market.take_over(None)
    out = market.take()
    channels = [channel for channel, _, _ in out]
    assert "trades_BTCUSDT" in channels and "ticker_BTCUSDT" in channels
    assert "kline_BTCUSDT" in channels and "kline_BTCUSDT_1h" in channels
    assert channels[0] == "trades_BTCUSDT"  # (no book yet: no depth snapshot)
    assert not any(archive for _, _, archive in out)  # a closed candle is archived once
    batch = msgspec.json.decode(out[channels.index("trades_BTCUSDT")][1], type=TradeBatch)
    assert [t.id for t in batch.trades] == [1] and batch.gap


async def test_private_events_kept_through_an_outage_go_out_if_the_lease_comes_back() -> None:
    bus = MemoryBus(Hub(), 200, 300.0)
    leads, lapsed = False, True
    router = EngineRouter(
        bus, Markets({}, bus, lambda _: None), lambda _: None,
        leads=lambda: leads, keeps=lambda: lapsed, queue_max=3,
    )  # fmt: skip
    for n in (1, 2):
        router.private(order("1001", n))
    assert bus.position("user_1001_order").seq == 0  # kept, not published
    leads, lapsed = True, False
    assert router.take_over(resumed=True)  # nothing missing
    replay = await bus.recover("user_1001_order", Position(bus.epoch, 0))
    assert [msgspec.json.decode(e.data)["order_id"] for e in replay.missed] == [1, 2]
    leads, lapsed = False, True
    for n in range(3, 8):  # one more than it keeps
        router.private(order("1001", n))
    leads, lapsed = True, False
    assert not router.take_over(resumed=True)  # some were dropped: subscribers must be told
    leads, lapsed = False, True
    router.private(order("1001", 8))
    router.abandon()  # another node leads: what was kept is not sent, ever
    assert not router.take_over(resumed=False)
    assert bus.position("user_1001_order").seq == 5


def test_a_standby_keeps_only_the_last_minute_of_trades_it_did_not_publish() -> None:
    """A warm standby withholds every trade of every symbol: kept by count alone (20,000 of
    ~250 B each per symbol), 2,000 busy symbols would hold ~10 GB. A hand-over needs only the
    trades since the leader's last publish, seconds: older ones go (by the engine's clock)."""
    merger = TradeMerger("BTCUSDT")
    for window in range(3):  # three batches of ten trades, 40 s apart
        for trade_id in range(window * 10 + 1, window * 10 + 11):
            merger.add(wire.Trade("BTCUSDT", trade_id, "1", "1", "buy", window * 40_000 + trade_id))
        batch = merger.flush()
        assert batch is not None
        merger.withheld(batch)
    assert [t.id for t in merger.unpublished] == list(range(11, 31))  # the first batch: 80 s old
    handed = merger.hand_over(25)
    assert handed is not None and [t.id for t in handed.trades] == [26, 27, 28, 29, 30]
    assert not handed.gap
