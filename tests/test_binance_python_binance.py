"""The real python-binance against a real pushd's Binance surfaces, only its URLs changed
(docs/binance.md): ``AsyncClient`` REST, ``BinanceSocketManager`` trade, kline, ticker and
multiplex sockets, ``DepthCacheManager``, USD-M mark price and partial depth sockets.

python-binance runs on asyncio in a worker thread; the daemon and the simulated feed on Trio
(tests/binance_clients.py). The feed is stopped from the client's side so that books stand
still and what the client holds can be compared with pushd's REST at the same id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import trio
from binance import AsyncClient, BinanceSocketManager, DepthCacheManager
from binance_clients import in_client_thread, restartable, start_fed, stop
from conftest import Running

from ingest.sim import Market
from ingest.transport import BookProvider

SYMBOL = "BTCUSDT"
EVENTS = 5  # messages each socket reads before the feed stops


def quick(socket: Any) -> Any:
    """A python-binance socket closes only once its read loop's wait for a message (10 s by
    default) ends: with the feed stopped that is the whole wait, so these tests shorten it."""
    socket.TIMEOUT = 0.5
    return socket


async def connect(running: Running) -> tuple[Any, Any]:
    """An ``AsyncClient`` and its ``BinanceSocketManager`` pointed at ``running``."""
    client = AsyncClient()
    client.API_URL = f"{running.http_url}/api"
    client.FUTURES_URL = f"{running.http_url}/fapi"
    sockets = BinanceSocketManager(client)
    sockets.STREAM_URL = f"ws://127.0.0.1:{running.ports.binance_spot}/"
    sockets.FSTREAM_URL = f"ws://127.0.0.1:{running.ports.binance_futures}/"
    return client, sockets


async def read(socket: Any, count: int = EVENTS, streams: int = 1) -> list[Any]:
    """``count`` messages from a python-binance socket (its errors arrive as messages; an
    all-market stream's are arrays), and more until ``streams`` distinct streams have been
    seen (a multiplex socket's)."""
    messages: list[Any] = []
    seen: set[Any] = set()
    async with socket as opened:
        while len(messages) < count or len(seen) < streams:
            message = await opened.recv()
            if isinstance(message, dict):
                assert message.get("e") != "error", message
            seen.add(message.get("stream") if isinstance(message, dict) else None)
            messages.append(message)
    return messages


async def test_spot_sockets_and_rest_agree(nursery: trio.Nursery) -> None:
    running, stop_feed = await start_fed(nursery, Market(seed=21, rate=5))

    async def main() -> dict[str, Any]:
        client, sockets = await connect(running)
        try:
            assert await client.ping() == {}
            klines, tickers, multiplex = await asyncio.gather(
                read(sockets.kline_socket(SYMBOL, AsyncClient.KLINE_INTERVAL_1MINUTE), 2),
                read(sockets.symbol_ticker_socket(SYMBOL), 2),
                read(sockets.multiplex_socket(["btcusdt@aggTrade", "btcusdt@bookTicker"]), 2, 2),
            )
            trades = await read(sockets.trade_socket(SYMBOL))
            stop(stop_feed)  # these trades are among the recent ones REST keeps
            return {
                "trades": trades, "klines": klines, "tickers": tickers, "multiplex": multiplex,
                "rest_trades": await client.get_recent_trades(symbol=SYMBOL, limit=1000),
                "rest_klines": await client.get_klines(symbol=SYMBOL, interval="1m", limit=10),
            }  # fmt: skip
        finally:
            await client.close_connection()

    seen = await in_client_thread(main)
    rest_trades = {t["id"]: (t["price"], t["qty"]) for t in seen["rest_trades"]}
    for trade in seen["trades"]:
        assert trade["e"] == "trade" and trade["s"] == SYMBOL
        assert isinstance(trade["t"], int) and isinstance(trade["p"], str)
        assert rest_trades[trade["t"]] == (trade["p"], trade["q"])  # the same trade on REST
    rest_open_times = {row[0] for row in seen["rest_klines"]}
    for kline in seen["klines"]:
        assert kline["e"] == "kline" and kline["k"]["i"] == "1m" and kline["k"]["s"] == SYMBOL
        assert kline["k"]["t"] in rest_open_times
    for ticker in seen["tickers"]:
        assert ticker["e"] == "24hrTicker" and ticker["s"] == SYMBOL and float(ticker["c"]) > 0
    streams = {message["stream"] for message in seen["multiplex"]}
    assert streams == {"btcusdt@aggTrade", "btcusdt@bookTicker"}
    for message in seen["multiplex"]:
        data = message["data"]
        if message["stream"] == "btcusdt@aggTrade":
            assert data["e"] == "aggTrade" and data["a"] == data["f"] == data["l"]
            assert isinstance(data["a"], int) and isinstance(data["p"], str)
        else:
            assert data["s"] == SYMBOL and float(data["b"]) < float(data["a"])


async def test_depth_cache_manager_holds_rest_depth(nursery: trio.Nursery) -> None:
    """python-binance's DepthCacheManager (REST depth, then the diffs after its lastUpdateId,
    a resync when U is not its last id + 1) holds the book pushd's REST depth gives at the
    same lastUpdateId."""
    await check_depth_cache(nursery, Market(seed=22, rate=5))


async def test_depth_cache_manager_resyncs_after_an_engine_restart(nursery: trio.Nursery) -> None:
    """The engine restarts under it (the snapshot pushd resyncs with is not sent: a break in
    the chain): the manager loads REST depth again and its book is right again."""
    market = Market(seed=25, rate=5)
    loads = await check_depth_cache(nursery, market, *restartable(market))
    assert loads >= 2


async def test_depth_cache_manager_resyncs_after_a_lost_depth_event(
    nursery: trio.Nursery,
) -> None:
    """One depth event is lost on its way to the manager's connection (the hub's view of
    the depth channel encodes it, and its frames never reach the outlet): the next diff's U
    is not its last id + 1, the manager loads REST depth again, and its book is right again."""
    market = Market(seed=26, rate=5)
    running, stop_feed = await start_fed(nursery, market)
    loads = await check_depth_cache(
        nursery,
        market,
        restart=lambda: lose_one_event(running, f"depth_{SYMBOL}"),
        fed=running,
        stop_feed=stop_feed,
    )
    assert loads >= 2


def lose_one_event(running: Running, internal: str) -> None:
    """The next event of ``internal`` is encoded by each of its Binance views (their state
    moves on as if it went out) and dropped before any subscriber's outbound buffer."""
    route = running.daemon.hub._routes[internal]
    for view in route.views.values():
        encode, lost = view.encode, [False]

        def losing(epoch: str, seq: int, data: Any, encode: Any = encode, lost: Any = lost) -> Any:
            frames = encode(epoch, seq, data)
            if lost[0] or not frames:
                return frames
            lost[0] = True
            return b""

        view.encode = losing


async def check_depth_cache(
    nursery: trio.Nursery,
    market: Market,
    provider: BookProvider | None = None,
    restart: Callable[[], None] | None = None,
    fed: Running | None = None,
    stop_feed: Callable[[], None] | None = None,
) -> int:
    """A DepthCacheManager until the feed stops (after ``restart``, once it has loaded REST
    depth again and had diffs after); its book against REST; returns its REST loads."""
    if fed is None or stop_feed is None:
        fed, stop_feed = await start_fed(nursery, market, provider)
    running = fed

    async def main() -> tuple[int, Any, Any, dict[str, Any], int]:
        client, sockets = await connect(running)
        rest_depth, loads = client.get_order_book, [0]

        async def counted(**params: Any) -> Any:  # the manager's own REST loads
            loads[0] += 1
            return await rest_depth(**params)

        client.get_order_book = counted
        try:
            quick(sockets.depth_socket(SYMBOL))  # the one the manager opens (one per stream)
            async with DepthCacheManager(client, SYMBOL, bm=sockets, limit=1000) as manager:
                for _ in range(EVENTS):
                    cache = await manager.recv()
                    assert not isinstance(cache, dict), cache  # an error message
                if restart is not None:
                    trio.from_thread.run_sync(restart)
                    while loads[0] < 2:
                        cache = await manager.recv()
                    for _ in range(EVENTS):
                        cache = await manager.recv()
                stop(stop_feed)
                while True:
                    rest = await rest_depth(symbol=SYMBOL, limit=1000)
                    # python-binance keeps the id it stands at only in a private attribute
                    while manager._last_update_id < rest["lastUpdateId"]:
                        cache = await manager.recv()
                    if manager._last_update_id == rest["lastUpdateId"]:
                        last_id = manager._last_update_id
                        return last_id, cache.get_bids(), cache.get_asks(), rest, loads[0]
        finally:
            await client.close_connection()

    last_id, bids, asks, rest, loads = await in_client_thread(main)
    assert last_id == rest["lastUpdateId"]
    assert bids == [[float(p), float(q)] for p, q in rest["bids"]]
    assert asks == [[float(p), float(q)] for p, q in rest["asks"]]
    assert len(bids) > 10 and len(asks) > 10
    return int(loads)


async def test_futures_mark_price_and_partial_depth(nursery: trio.Nursery) -> None:
    running, stop_feed = await start_fed(nursery, Market(seed=23, rate=5))

    async def main() -> dict[str, Any]:
        client, sockets = await connect(running)
        try:
            marks = await read(sockets.symbol_mark_price_socket(SYMBOL), 2)
            depth = []
            async with quick(sockets.futures_depth_socket(SYMBOL, "10")) as socket:
                while len(depth) < EVENTS:
                    depth.append(await socket.recv())
                stop(stop_feed)
                last = depth[-1]["data"]
                while True:  # the last partial book is REST's top at the same id
                    rest = await client.futures_order_book(symbol=SYMBOL, limit=10)
                    while last["u"] < rest["lastUpdateId"]:
                        last = (await socket.recv())["data"]
                    if last["u"] == rest["lastUpdateId"]:
                        break
            premium = await client.futures_mark_price(symbol=SYMBOL)
            return {"marks": marks, "depth": depth, "last": last, "rest": rest,
                    "premium": premium}  # fmt: skip
        finally:
            await client.close_connection()

    seen = await in_client_thread(main)
    for message in seen["marks"]:
        assert message["stream"] == "btcusdt@markPrice@1s"
        assert message["data"]["e"] == "markPriceUpdate" and float(message["data"]["p"]) > 0
    for message in seen["depth"]:
        data = message["data"]
        assert message["stream"] == "btcusdt@depth10" and data["e"] == "depthUpdate"
        assert data["pu"] < data["u"] and 0 < len(data["b"]) <= 10 and 0 < len(data["a"]) <= 10
    last, rest = seen["last"], seen["rest"]
    assert (last["b"], last["a"]) == (rest["bids"], rest["asks"])
    assert seen["premium"]["symbol"] == SYMBOL and float(seen["premium"]["markPrice"]) > 0


async def test_all_market_sockets(nursery: trio.Nursery) -> None:
    """``ticker_socket`` (``/ws/!ticker@arr``), ``miniticker_socket``
    (``/ws/!miniTicker@arr@1000ms``), ``futures_ticker_socket`` and ``all_mark_price_socket``
    (``/market/stream?streams=!ticker@arr`` / ``!markPrice@arr@1s``): each message one array
    of the symbols that changed, each symbol at most once."""
    running, _stop_feed = await start_fed(nursery, Market(seed=24, rate=5))

    async def main() -> list[list[dict[str, Any]]]:
        client, sockets = await connect(running)
        try:
            return list(await asyncio.gather(
                read(quick(sockets.ticker_socket()), 3),
                read(quick(sockets.miniticker_socket()), 3),
                read(quick(sockets.futures_ticker_socket()), 3),
                read(quick(sockets.all_mark_price_socket()), 3),
            ))  # fmt: skip
        finally:
            await client.close_connection()

    spot, mini, futures, marks = await in_client_thread(main)
    symbols = {"BTCUSDT", "ETHUSDT", "SOLUSDT"}

    def arrays(messages: list[Any], stream: str | None) -> list[list[dict[str, Any]]]:
        if stream is not None:  # a combined socket's: wrapped
            assert {m["stream"] for m in messages} == {stream}
            messages = [m["data"] for m in messages]
        for array in messages:
            assert isinstance(array, list) and array
            assert len({p["s"] for p in array}) == len(array) and {p["s"] for p in array} <= symbols
        return messages

    for array in arrays(spot, None):
        assert all(p["e"] == "24hrTicker" and "x" in p and "w" in p for p in array)
    for array in arrays(mini, None):
        assert all(p["e"] == "24hrMiniTicker" and float(p["c"]) > 0 for p in array)
    for array in arrays(futures, "!ticker@arr"):
        assert all(p["e"] == "24hrTicker" and "x" not in p for p in array)
    marked = arrays(marks, "!markPrice@arr@1s")
    assert all(p["e"] == "markPriceUpdate" and float(p["p"]) > 0 for a in marked for p in a)
    assert {p["s"] for a in marked for p in a} == symbols  # each symbol's mark changes
