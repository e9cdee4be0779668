"""The all-market streams (``!ticker@arr``, ``!miniTicker@arr``, ``!markPrice@arr[@1s]``)
through real sockets: requests, payload forms, what they follow and when their task runs.
The real clients' tests: ``test_binance_ccxt.py``, ``test_binance_python_binance.py``,
``test_binance_workers.py``."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from conftest import Running, make_config, open_client, start_daemon
from trio_websocket import ConnectionClosed

from pushd.gateway.lifecycle import CloseCode

TICKER = {"s": "BTCUSDT", "open": "1", "high": "2", "low": "1", "last": "2", "volume": "2",
          "quoteVolume": "3", "change": "1", "changePercent": "100", "count": 2,
          "firstId": 1, "lastId": 2, "openTime": 1, "closeTime": 2}  # fmt: skip
MARK = {"s": "ETHUSDT", "markPrice": "1.5", "indexPrice": "1", "estimatedSettlePrice": "1",
        "fundingRate": "0", "premiumIndex": "0", "nextFundingTime": 1, "T": 1}  # fmt: skip


async def start(nursery: trio.Nursery) -> Running:
    surfaces = {"spot": {"enabled": True, "port": 0}, "futures": {"enabled": True, "port": 0}}
    return await start_daemon(nursery, make_config(binance=surfaces))


def followed(running: Running) -> set[str]:
    return set(running.daemon.hub.channels())


async def test_subscribe_switch_form_and_unsubscribe(nursery: trio.Nursery) -> None:
    running = await start(nursery)
    dialect = running.daemon.binance["futures"]._dialect
    url = f"ws://127.0.0.1:{running.ports.binance_futures}/ws"
    async with open_client(url) as client:
        streams = ["!markPrice@arr@1s", "!miniTicker@arr", "!ticker@arr"]
        assert await client.call({"method": "SUBSCRIBE", "params": streams, "id": 1}) == {
            "result": None, "id": 1}  # fmt: skip
        symbols = running.daemon.config.markets
        task = dialect._arrays  # the arrays' task runs
        assert task is not None
        assert followed(running) == {f"{kind}_{s}" for kind in ("ticker", "markprice")
                                     for s in symbols}  # fmt: skip
        await running.publish("markprice_ETHUSDT", MARK)
        await running.publish("ticker_BTCUSDT", {**TICKER, "last": "1.9"})
        await running.publish("ticker_BTCUSDT", TICKER)  # the latest of an interval counts
        got: dict[str, Any] = {}
        while len(got) < 3:  # one array per stream, raw: told apart by their payloads' "e"
            array = await client.recv()
            event = array[0]["e"]
            if event == "markPriceUpdate" or array[-1]["c"] == "2":  # (the 1 s tick may
                got[event] = array  # fall between the two ticker publishes: 1.9 first)
        assert [(p["s"], p["p"]) for p in got["markPriceUpdate"]] == [("ETHUSDT", "1.5")]
        assert [(p["s"], p["c"]) for p in got["24hrMiniTicker"]] == [("BTCUSDT", "2")]
        assert [(p["s"], p["w"]) for p in got["24hrTicker"]] == [("BTCUSDT", "1.50000000")]
        reply = await client.call({"method": "SET_PROPERTY", "params": ["combined", True], "id": 2})
        assert reply == {"result": None, "id": 2}
        assert dialect._arrays is task and not task.cancel_called  # the form changed, not
        assert followed(running) == {f"{kind}_{s}" for kind in ("ticker", "markprice")
                                     for s in symbols}  # what is followed  # fmt: skip
        await running.publish("markprice_ETHUSDT", {**MARK, "markPrice": "1.6"})
        wrapped = await client.recv()
        assert wrapped == {"stream": "!markPrice@arr@1s", "data": [{
            "e": "markPriceUpdate", "E": 1, "s": "ETHUSDT", "p": "1.6", "i": "1", "P": "1",
            "r": "0", "T": 1}]}  # fmt: skip
        unsubscribe = {"method": "UNSUBSCRIBE", "params": streams[:2], "id": 3}
        assert await client.call(unsubscribe) == {"result": None, "id": 3}
        assert followed(running) == {f"ticker_{s}" for s in symbols}  # !ticker@arr's
        unsubscribe = {"method": "UNSUBSCRIBE", "params": streams[2:], "id": 4}
        assert await client.call(unsubscribe) == {"result": None, "id": 4}
        assert followed(running) == set()
        await trio.testing.wait_all_tasks_blocked()
        assert task.cancelled_caught and dialect._arrays is None  # it ended with the last


async def test_a_spot_surface_refuses_mark_prices(nursery: trio.Nursery) -> None:
    running = await start(nursery)
    url = f"ws://127.0.0.1:{running.ports.binance_spot}/ws"
    async with open_client(url) as client:
        reply = await client.call({"method": "SUBSCRIBE", "params": ["!markPrice@arr"], "id": 1})
        assert reply["error"]["code"] == 2 and reply["id"] == 1
        listed = await client.call({"method": "LIST_SUBSCRIPTIONS", "id": 2})
        assert listed == {"result": [], "id": 2}


async def test_a_failing_interval_costs_that_interval_not_the_surface(
    nursery: trio.Nursery, monkeypatch: Any
) -> None:
    """The arrays' task is the surface's, not a connection's: a bug in one interval's arrays
    (here: ``AllMarket.due`` raising once) is logged and skips that interval; the surface, its
    connections and the next interval's arrays go on."""
    from pushd.binance.arrays import AllMarket

    running = await start(nursery)
    url = f"ws://127.0.0.1:{running.ports.binance_futures}/ws"
    due = AllMarket.due
    failed = trio.Event()

    def due_once_broken(self: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug in an interval's arrays")
        return due(self)

    monkeypatch.setattr(AllMarket, "due", due_once_broken)
    async with open_client(url) as client:
        reply = await client.call({"method": "SUBSCRIBE", "params": ["!markPrice@arr"], "id": 1})
        assert reply == {"result": None, "id": 1}
        await failed.wait()
        await running.publish("markprice_ETHUSDT", MARK)
        array = await client.recv()
        assert [(p["s"], p["p"]) for p in array] == [("ETHUSDT", "1.5")]
        listed = await client.call({"method": "LIST_SUBSCRIPTIONS", "id": 2})
        assert listed == {"result": ["!markPrice@arr"], "id": 2}


async def test_an_unsubscribe_refused_for_its_weight_still_releases_its_streams(
    nursery: trio.Nursery,
) -> None:
    """An UNSUBSCRIBE of 101 names costs two message tokens; with one left the connection is
    closed for its rate (4001), after the session has already let its streams go: the
    all-market stream's follower and taps are released with it, not kept for ever."""
    surfaces = {"futures": {"enabled": True, "port": 0}}
    limits = {"messages_per_second": 0.001, "message_burst": 2}
    running = await start_daemon(nursery, make_config(binance=surfaces, limits=limits))
    dialect = running.daemon.binance["futures"]._dialect
    url = f"ws://127.0.0.1:{running.ports.binance_futures}/ws"
    async with open_client(url) as client:
        reply = await client.call({"method": "SUBSCRIBE", "params": ["!ticker@arr"], "id": 1})
        assert reply == {"result": None, "id": 1} and followed(running)
        await client.send({"method": "UNSUBSCRIBE", "params": ["!ticker@arr"] * 101, "id": 2})
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await client.ws.get_message()  # refused: the close, not an answer
        assert closed.value.reason.code == CloseCode.RATE_LIMITED
    await trio.testing.wait_all_tasks_blocked()
    assert not dialect._every.follows()
    assert followed(running) == set() and dialect._arrays is None
