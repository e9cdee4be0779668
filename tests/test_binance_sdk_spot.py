"""Binance's own connector, binance-sdk-spot, against a real pushd's spot surface, only its
URLs changed (docs/binance.md): its WebSocket streams client (requests with UUID ids,
``LIST_SUBSCRIPTIONS``), every stream parsed into its strict pydantic models (prices and
quantities strings, ids and times integers: a payload that does not fit never reaches the
callback), its REST client's depth agreeing with the diff stream by id, and a bad stream name
answered with a nested error on a socket that stays open.

The connector runs on asyncio in a worker thread (tests/binance_clients.py).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from decimal import Decimal
from typing import Any

import pytest
import trio
from binance_clients import in_client_thread, start_fed, start_surfaces, stop
from binance_common.configuration import (
    ConfigurationRestAPI,
    ConfigurationWebSocketStreams,
)
from binance_common.utils import get_uuid
from binance_sdk_spot.spot import Spot
from binance_sdk_spot.websocket_streams.models import (
    KlineIntervalEnum,
    PartialBookDepthLevelsEnum,
)
from conftest import Running

from ingest import wire
from ingest.sim import Market

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KINDS = ["trade", "aggTrade", "kline_1m", "ticker", "miniTicker", "bookTicker", "depth", "depth5"]
STREAMS = [f"btcusdt@{kind}" for kind in KINDS]


def spot(running: Running) -> Any:
    return Spot(
        config_rest_api=ConfigurationRestAPI(base_path=running.http_url),
        config_ws_streams=ConfigurationWebSocketStreams(
            stream_url=f"ws://127.0.0.1:{running.ports.binance_spot}"
        ),
    )


class Received:
    """Each stream's parsed messages, and the errors the connector reported."""

    def __init__(self) -> None:
        self.by_stream: dict[str, list[Any]] = {name: [] for name in STREAMS}
        self.errors: list[Any] = []
        self.changed = asyncio.Event()

    def keeper(self, name: str) -> Any:
        def keep(message: Any) -> None:
            self.by_stream[name].append(message)
            self.changed.set()

        return keep

    def error(self, error: Any) -> None:
        self.errors.append(error)
        self.changed.set()

    async def until(self, condition: Any) -> None:
        while not condition():
            assert not self.errors, self.errors  # a model that did not fit, an error frame
            self.changed.clear()
            await self.changed.wait()


def same_book(rest: Any, engine: wire.BookSnapshot) -> bool:
    """Whether REST depth gives the engine's book (pushd's next poll changes nothing then)."""
    return all(
        [(Decimal(p), Decimal(q)) for p, q in got] == [(Decimal(p), Decimal(q)) for p, q in want]
        for got, want in ((rest.bids, engine.bids), (rest.asks, engine.asks))
    )


async def test_streams_in_strict_models_and_rest_depth(nursery: trio.Nursery) -> None:
    market = Market(seed=41, rate=5)
    running, stop_feed = await start_fed(nursery, market)
    levels = running.daemon.config.markets["BTCUSDT"].depth_levels  # what pushd polls

    async def main() -> dict[str, Any]:
        client = spot(running)
        streams = await client.websocket_streams.create_connection()
        assert streams is not None  # the connector logs and returns None when it cannot
        received = Received()
        streams.on_connection("error", received.error)
        try:
            handles = {
                "btcusdt@trade": await streams.trade(symbol="BTCUSDT"),
                "btcusdt@aggTrade": await streams.agg_trade(symbol="BTCUSDT"),
                "btcusdt@kline_1m": await streams.kline(
                    symbol="BTCUSDT", interval=KlineIntervalEnum.INTERVAL_1m
                ),
                "btcusdt@ticker": await streams.ticker(symbol="BTCUSDT"),
                "btcusdt@miniTicker": await streams.mini_ticker(symbol="BTCUSDT"),
                "btcusdt@bookTicker": await streams.book_ticker(symbol="BTCUSDT"),
                "btcusdt@depth": await streams.diff_book_depth(symbol="BTCUSDT"),
                "btcusdt@depth5": await streams.partial_book_depth(
                    symbol="BTCUSDT", levels=PartialBookDepthLevelsEnum.LEVELS_5
                ),
            }
            for name, handle in handles.items():
                handle.on("message", received.keeper(name))
            listed = await streams.list_subscribe()
            await received.until(lambda: all(len(m) >= 2 for m in received.by_stream.values()))
            stop(stop_feed)  # then what pushd was told before reaches the connector:
            engine = trio.from_thread.run_sync(market.book, "BTCUSDT", levels, 0)
            diffs = received.by_stream["btcusdt@depth"]
            while True:  # REST depth (the connector's REST client) at the engine's last book
                rest = (await asyncio.to_thread(client.rest_api.depth, "BTCUSDT", 1000)).data()
                last = rest.last_update_id
                if same_book(rest, engine):  # no diff after it: the stream's last is at its id
                    await received.until(lambda last=last: diffs[-1].u >= last)
                    break
                await received.until(lambda last=last: diffs[-1].u > last)  # one on its way
            return {"listed": listed, "by_stream": received.by_stream, "rest": rest}
        finally:
            await streams.close_connection(close_session=True)

    seen = await in_client_thread(main)
    assert UUID.match(seen["listed"]["id"])  # the connector's own request id, echoed
    assert sorted(seen["listed"]["result"]) == sorted(STREAMS)
    by_stream = seen["by_stream"]
    for trade in by_stream["btcusdt@trade"]:
        assert trade.e == "trade" and trade.s == "BTCUSDT" and trade.t > 0
    for agg in by_stream["btcusdt@aggTrade"]:
        assert agg.e == "aggTrade" and agg.a == agg.f == agg.l
    for kline in by_stream["btcusdt@kline_1m"]:
        assert kline.e == "kline" and kline.k.i == "1m" and kline.k.t < kline.k.T
    assert all(t.e == "24hrTicker" and float(t.c) > 0 for t in by_stream["btcusdt@ticker"])
    assert all(t.e == "24hrMiniTicker" for t in by_stream["btcusdt@miniTicker"])
    assert all(float(t.b) < float(t.a) for t in by_stream["btcusdt@bookTicker"])
    diffs = by_stream["btcusdt@depth"]
    assert all(a.u + 1 == b.U for a, b in itertools.pairwise(diffs))  # spot's chain
    assert all(len(p.bids) == len(p.asks) == 5 for p in by_stream["btcusdt@depth5"])
    rest = seen["rest"]  # and no diff after the engine's last book
    assert rest.last_update_id == diffs[-1].u and len(rest.bids) > 10


async def test_a_bad_stream_name_gets_a_nested_error_and_the_socket_stays_open(
    nursery: trio.Nursery,
) -> None:
    """Through the connector's own request machinery (UUID ids, replies matched by id)."""
    running = await start_surfaces(nursery, Market(seed=42))

    async def main() -> tuple[Any, Any]:
        streams = await spot(running).websocket_streams.create_connection()
        try:
            connection = streams.connections[0]
            bad = {"method": "SUBSCRIBE", "params": ["btcusdt@nonsense"], "id": get_uuid()}
            with pytest.raises(ValueError) as error:
                await asyncio.wait_for(await streams.send_message(bad, connection), 10)
            return error.value.args[0], await streams.list_subscribe()
        finally:
            await streams.close_connection(close_session=True)

    error, listed = await in_client_thread(main)
    assert error["code"] == 2 and "btcusdt@nonsense" in error["msg"]  # nested, code 2
    assert listed["result"] == [] and UUID.match(listed["id"])  # the same socket answers
