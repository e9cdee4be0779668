"""The real ccxt (ccxt.pro) against a real pushd's Binance surfaces, only its URLs changed.

ccxt runs on asyncio in a worker thread (its own event loop); the daemon, the simulated engine
and its feed run on Trio here. The market is halted from ccxt's side (``trio.from_thread``) so
that the book stands still and ccxt's book can be compared with pushd's REST depth at the same
``lastUpdateId``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ccxt
import ccxt.pro as ccxtpro
import pytest
import trio
from binance_clients import restartable, start_feed, start_surfaces, stop
from conftest import Running, feed, open_client, start_daemon
from redis_servers import Redis
from test_cluster import redis_config

from ingest.sim import Market
from ingest.transport import serve_snapshots

SPOT, FUTURES = "BTC/USDT", "BTC/USDT:USDT"
UPDATES = 5  # book updates each watch sees before the feed stops
SETTLE_S = 20  # the books catch up with the last depth event within this
SURFACES = {"spot": {"enabled": True, "port": 0}, "futures": {"enabled": True, "port": 0}}


def exchange(running: Running) -> Any:
    """ccxt.pro's binance with every URL it uses pointed at ``running`` (docs/binance.md)."""
    ports, http = running.ports, running.http_url
    ex = ccxtpro.binance()
    ex.urls["api"]["public"] = f"{http}/api/v3"
    ex.urls["api"]["fapiPublic"] = f"{http}/fapi/v1"
    ex.urls["api"]["dapiPublic"] = f"{http}/dapi/v1"
    # /stream: ccxt files spot data under the futures symbol unless the spot URL says so
    ex.urls["api"]["ws"]["spot"] = f"ws://127.0.0.1:{ports.binance_spot}/stream"
    ex.urls["api"]["ws"]["linear"] = f"ws://127.0.0.1:{ports.binance_futures}/ws"
    return ex


async def watch(ex: Any, market: Market, stop_feed: Callable[[], None]) -> dict[str, Any]:
    """Watch everything together for a while, halt the market, wait until both books stand at
    pushd's REST depth's lastUpdateId and the market's last trade has arrived; returns what was
    seen."""
    await ex.load_markets()
    seen: dict[str, Any] = {"trades": [], "tickers": [], "marks": [], "candles": {}}

    async def books(symbol: str) -> None:
        for _ in range(UPDATES):
            await ex.watch_order_book(symbol)

    async def trades() -> None:
        while len(seen["trades"]) < 3:
            seen["trades"] += await ex.watch_trades(SPOT)

    async def tickers() -> None:
        seen["tickers"].append(await ex.watch_ticker(SPOT))  # miniTicker
        seen["tickers"].append(await ex.watch_ticker(SPOT, {"name": "ticker"}))

    async def marks() -> None:
        seen["marks"].append(await ex.watch_mark_price(FUTURES))

    async def candles(symbol: str) -> None:
        seen["candles"][symbol] = await ex.watch_ohlcv(symbol, "1m")

    await asyncio.gather(books(SPOT), books(FUTURES), trades(), tickers(), marks(),
                         candles(SPOT), candles(FUTURES))  # fmt: skip
    stop(stop_feed)
    last_trade_id = str(market.books["BTCUSDT"].trade_id)  # the halted market's last
    while ex.trades[SPOT][-1]["id"] != last_trade_id:  # pushd flushes trades in batches:
        await ex.watch_trades(SPOT)  # the last batch may reach ccxt after REST answered
    for symbol in (SPOT, FUTURES):
        seen[symbol] = await settled(ex, symbol)
    seen["rest_trades"] = await ex.fetch_trades(SPOT, limit=1000)
    seen["held_trades"] = list(ex.trades[SPOT])
    for symbol in (SPOT, FUTURES):
        seen[f"ohlcv {symbol}"] = await ex.fetch_ohlcv(symbol, "1m", limit=10)
    deadline = time.monotonic() + SETTLE_S
    while (ticker := await ex.fetch_ticker(SPOT))["last"] != seen["held_trades"][-1]["price"]:
        assert time.monotonic() < deadline, (ticker["last"], seen["held_trades"][-1])
        await asyncio.sleep(0.1)  # the ticker is pushed each ticker_interval_ms
    seen["rest_ticker"] = ticker
    seen["funding"] = await ex.fetch_funding_rate(FUTURES)
    return seen


async def settled(ex: Any, symbol: str) -> tuple[int, list[Any], list[Any], dict[str, Any]]:
    """Once the feed has stopped: the book ccxt holds when it stands at REST depth's
    lastUpdateId (nonce, bids, asks), and that REST depth."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        rest = await ex.fetch_order_book(symbol, 1000)
        held = ex.orderbooks.get(symbol)
        if held is not None and held["nonce"] == rest["nonce"]:
            return held["nonce"], held["bids"][:], held["asks"][:], rest
        assert time.monotonic() < deadline, (symbol, held and held["nonce"], rest["nonce"])
        await asyncio.sleep(0.1)  # the last diffs are on their way


async def run_ccxt(running: Running, watching: Callable[[Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        ex = exchange(running)
        try:
            return await watching(ex)
        finally:
            await ex.close()

    with trio.fail_after(90):
        return await trio.to_thread.run_sync(asyncio.run, main())


async def test_ccxt_watches_spot_and_futures_and_agrees_with_rest(nursery: trio.Nursery) -> None:
    market = Market(seed=7, rate=5)
    running = await start_surfaces(nursery, market)
    await check_ccxt(nursery, market, running, running)


@pytest.mark.parametrize("redis", ["redis"], indirect=True)
async def test_ccxt_on_a_gateway_node_without_the_book(nursery: trio.Nursery, redis: Redis) -> None:
    """Everywhere pushd runs: a gateway node has no book in process; REST depth and the
    streams still agree by id (the state the compute node stored and the diffs after it)."""
    market = Market(seed=8, rate=5)
    snapshot_port = await nursery.start(serve_snapshots, market.book, "127.0.0.1", 0)
    engine = {"snapshot_enabled": True, "snapshot_port": snapshot_port}
    compute = await start_daemon(nursery, redis_config(redis, "compute", engine=engine))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway", binance=SURFACES))
    await check_ccxt(nursery, market, gateway, compute)


@pytest.mark.parametrize("redis", ["redis"], indirect=True)
async def test_partial_depth_and_book_ticker_on_a_gateway_node(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """The top of the book on a node without the book: its mirror is seeded by the state the
    compute node stored and the diffs after it, then moved by the stream."""
    market = Market(seed=12, rate=5)
    snapshot_port = await nursery.start(serve_snapshots, market.book, "127.0.0.1", 0)
    engine = {"snapshot_enabled": True, "snapshot_port": snapshot_port}
    compute = await start_daemon(nursery, redis_config(redis, "compute", engine=engine))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway", binance=SURFACES))
    nursery.start_soon(feed(compute, market))
    streams = "btcusdt@depth5@100ms/btcusdt@bookTicker"
    url = f"ws://127.0.0.1:{gateway.ports.binance_spot}/stream?streams={streams}"
    seen: dict[str, list[Any]] = {"btcusdt@depth5@100ms": [], "btcusdt@bookTicker": []}
    async with open_client(url) as client:
        with trio.fail_after(30):
            while min(len(got) for got in seen.values()) < 5:
                message = await client.recv()
                seen[message["stream"]].append(message["data"])
    ids = [p["lastUpdateId"] for p in seen["btcusdt@depth5@100ms"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(p["bids"]) == len(p["asks"]) == 5 for p in seen["btcusdt@depth5@100ms"])
    for top in seen["btcusdt@bookTicker"]:
        assert float(top["b"]) < float(top["a"]) and top["s"] == "BTCUSDT"


async def check_ccxt(
    nursery: trio.Nursery, market: Market, clients: Running, engine: Running
) -> None:
    """ccxt on ``clients``'s surfaces while the simulated engine feeds ``engine``."""
    stop_feed = start_feed(nursery, engine, market)
    seen = await run_ccxt(clients, lambda ex: watch(ex, market, stop_feed))

    for symbol in (SPOT, FUTURES):
        nonce, bids, asks, rest = seen[symbol]
        assert nonce == rest["nonce"]
        assert bids == rest["bids"]
        assert asks == rest["asks"]
        assert len(bids) > 10 and len(asks) > 10
    # the trades streamed last are those fetch_trades (aggTrades) gives, by id, price, amount
    rest = {t["id"]: (t["price"], t["amount"]) for t in seen["rest_trades"]}
    held = [(t["id"], t["price"], t["amount"]) for t in seen["held_trades"][-20:]]
    assert held and all(rest.get(i) == (price, amount) for i, price, amount in held)
    assert max(rest, key=int) == held[-1][0]
    mini, full = seen["tickers"]
    assert mini["symbol"] == full["symbol"] == SPOT and mini["last"] and full["last"]
    assert full["vwap"] is not None  # only the full ticker carries w
    assert seen["marks"][0]["markPrice"] > 0
    for symbol in (SPOT, FUTURES):  # the streamed candles are REST's, by open time
        rest_open_times = {row[0] for row in seen[f"ohlcv {symbol}"]}
        streamed = seen["candles"][symbol]
        assert streamed and {row[0] for row in streamed} <= rest_open_times
    assert seen["rest_ticker"]["last"] == held[-1][1]  # the last trade's price
    assert seen["funding"]["markPrice"] > 0 and seen["funding"]["fundingRate"] is not None


async def test_ccxt_resyncs_after_a_break_in_the_chain(nursery: trio.Nursery) -> None:
    """The engine restarts (its book versions start lower): pushd publishes a snapshot
    mid-stream, which the dialect does not send (Binance has none), so the next diff does not
    follow the last one ccxt holds. ccxt says so (ChecksumError), is asked again, reloads REST
    depth, and its book is right again."""
    market = Market(seed=11, rate=5)
    provider, restart_engine = restartable(market)
    running = await start_surfaces(nursery, market, provider)
    stop_feed = start_feed(nursery, running, market)

    async def watching(ex: Any) -> dict[str, Any]:
        await ex.load_markets()
        for _ in range(UPDATES):
            await ex.watch_order_book(SPOT)
        trio.from_thread.run_sync(restart_engine)
        breaks = watched = 0
        while watched < UPDATES:  # a break, then books again
            try:
                await ex.watch_order_book(SPOT)
                watched += 1 if breaks else 0
            except ccxt.ChecksumError:
                breaks += 1
        stop(stop_feed)
        return {"breaks": breaks, "book": await settled(ex, SPOT)}

    seen = await run_ccxt(running, watching)
    assert seen["breaks"] >= 1
    nonce, bids, asks, rest = seen["book"]
    assert (nonce, bids, asks) == (rest["nonce"], rest["bids"], rest["asks"])


async def test_ccxt_watches_all_market_tickers_and_mark_prices(nursery: trio.Nursery) -> None:
    """``watch_tickers()`` with no symbols subscribes ``!miniTicker@arr`` (``name='ticker'``:
    ``!ticker@arr``), ``watch_mark_prices()`` ``!markPrice@arr@1s``: one array a second of the
    symbols that changed, filed under ccxt's symbols. On spot ccxt reads the arrays on a
    ``/ws`` URL only (on ``/stream`` it drops a wrapped array), so spot is watched by an
    exchange that loads spot markets only (docs/binance.md)."""
    market = Market(seed=9, rate=5)
    running = await start_surfaces(nursery, market)
    nursery.start_soon(feed(running, market))
    symbols = {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
    swaps = {f"{s}:USDT" for s in symbols}

    async def every(call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        got: dict[str, Any] = {}
        while set(got) != symbols and set(got) != swaps:  # each symbol once it changed
            got.update(await call())
        return got

    async def main() -> list[dict[str, Any]]:
        ex = exchange(running)
        spot = exchange(running)
        spot.options["fetchMarkets"] = {"types": ["spot"]}
        spot.urls["api"]["ws"]["spot"] = f"ws://127.0.0.1:{running.ports.binance_spot}/ws"
        try:
            return list(await asyncio.gather(
                every(lambda: spot.watch_tickers()),
                every(lambda: spot.watch_tickers(None, {"name": "ticker"})),
                every(lambda: ex.watch_tickers(None, {"type": "swap"})),
                every(lambda: ex.watch_tickers(None, {"type": "swap", "name": "ticker"})),
                every(lambda: ex.watch_mark_prices()),
            ))  # fmt: skip
        finally:
            await ex.close()
            await spot.close()

    with trio.fail_after(60):
        mini, full, swap_mini, swap_full, marks = await trio.to_thread.run_sync(asyncio.run, main())
    for tickers, event in ((mini, "24hrMiniTicker"), (full, "24hrTicker"),
                           (swap_mini, "24hrMiniTicker"), (swap_full, "24hrTicker")):  # fmt: skip
        assert all(t["info"]["e"] == event and t["last"] > 0 for t in tickers.values())
    assert set(mini) == set(full) == symbols and set(swap_mini) == swaps
    assert all(t["vwap"] is not None for t in (*full.values(), *swap_full.values()))
    assert set(marks) == swaps and all(t["markPrice"] > 0 for t in marks.values())
