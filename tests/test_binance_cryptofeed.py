"""The real cryptofeed against a real pushd's Binance surfaces over wss:// with a certificate
the test makes (cryptofeed refuses ws://): ``Binance`` and ``BinanceFutures``
subclasses with only their endpoints changed (docs/binance.md), trades, L2 book and ticker
callbacks (and USD-M funding), and the book cryptofeed keeps equal to pushd's REST depth at
the same lastUpdateId.

cryptofeed runs on asyncio in a worker thread (tests/binance_clients.py). Its sockets trust
the test CA through the endpoint's ``ssl`` option (passed to ``websockets.connect``). Its REST
(``requests`` for exchangeInfo, ``aiohttp`` for depth) is plain http here: cryptofeed takes
it, and aiohttp fixes its trust store when imported (no per-client CA for https).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from binance_clients import in_client_thread, restartable, start_fed, stop
from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint
from cryptofeed.defines import FUNDING, L2_BOOK, TICKER, TRADES
from cryptofeed.exchanges import Binance, BinanceFutures
from test_tls import Certificates

from ingest import wire
from ingest.sim import Market
from ingest.transport import BookProvider

TRADES_SEEN = 5  # trades each feed sees before the simulated feed stops
MARKETS = {  # market: the cryptofeed class, its REST prefix, the symbol as cryptofeed names it
    "spot": (Binance, "/api/v3", "BTC-USDT"),
    "futures": (BinanceFutures, "/fapi/v1", "BTC-USDT-PERP"),
}


class Seen:
    """What the callbacks received; ``changed`` wakes whoever waits for more."""

    def __init__(self) -> None:
        self.trades: list[Any] = []
        self.tickers: list[Any] = []
        self.funding: list[Any] = []
        self.books: list[tuple[int, dict[str, dict[Decimal, Decimal]]]] = []
        self.snapshots = 0  # books cryptofeed loaded from REST depth (no delta)
        self.changed = asyncio.Event()

    def callbacks(self) -> dict[str, Any]:
        def keep(into: list[Any], convert: Any = lambda obj: obj) -> Any:
            async def callback(obj: Any, receipt_timestamp: float) -> None:
                into.append(convert(obj))
                self.changed.set()

            return callback

        return {
            TRADES: keep(self.trades),
            TICKER: keep(self.tickers),
            FUNDING: keep(self.funding),
            L2_BOOK: keep(self.books, self.book),
        }

    def book(self, book: Any) -> tuple[int, dict[str, dict[Decimal, Decimal]]]:
        self.snapshots += book.delta is None
        return book.sequence_number, book.book.to_dict()

    def caught_up(self, engine: wire.BookSnapshot, last_trade_id: int) -> bool:
        """Whether the book held is the engine's and the last trade seen its last one."""
        if not self.books or not self.trades or int(self.trades[-1].id) != last_trade_id:
            return False
        book = self.books[-1][1]
        return all(
            book[side] == {Decimal(p): Decimal(q) for p, q in levels}
            for side, levels in (("bid", engine.bids), ("ask", engine.asks))
        )

    async def until(self, condition: Any) -> None:
        while not condition():
            self.changed.clear()
            await self.changed.wait()


def feed_class(market: str, ws_url: str, http: str, ssl_context: ssl.SSLContext) -> Any:
    """cryptofeed's class for ``market`` with only its endpoints pointed at pushd."""
    base, prefix, _ = MARKETS[market]
    routes = Routes(f"{prefix}/exchangeInfo", l2book=f"{prefix}/depth?symbol={{}}&limit={{}}")
    options = {**(base.websocket_endpoints[0].options or {}), "ssl": ssl_context}
    return type(f"Pushd{base.__name__}", (base,), {
        "websocket_endpoints": [WebsocketEndpoint(ws_url, options=options)],
        "rest_endpoints": [RestEndpoint(http, routes=routes)],
    })  # fmt: skip


@pytest.mark.parametrize("market", ["spot", "futures"])
async def test_cryptofeed_over_wss_keeps_the_right_book(
    nursery: trio.Nursery, tmp_path: Path, market: str
) -> None:
    simulated = Market(seed=31, rate=5)
    seen = await run_cryptofeed(nursery, tmp_path, simulated, market)
    assert seen.snapshots == 1


async def test_cryptofeed_reloads_its_book_after_an_engine_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The engine restarts under cryptofeed (a break in the chain: the snapshot pushd resyncs
    with is not sent): cryptofeed says "Missing book update detected", loads REST depth
    again, and its book is right again."""
    simulated = Market(seed=32, rate=5)
    provider, restart = restartable(simulated)
    seen = await run_cryptofeed(nursery, tmp_path, simulated, "spot", provider, restart)
    assert seen.snapshots >= 2


async def run_cryptofeed(
    nursery: trio.Nursery,
    tmp_path: Path,
    simulated: Market,
    market: str,
    provider: BookProvider | None = None,
    restart: Callable[[], None] | None = None,
) -> Seen:
    """cryptofeed on ``market`` until the feed stops (after ``restart``, once it has
    reloaded its book); checks what it holds against REST; returns what it saw."""
    certs = Certificates(tmp_path)
    tls = certs.tls_section()
    running, stop_feed = await start_fed(nursery, simulated, provider, spot=tls, futures=tls)
    port = running.ports.binance_spot if market == "spot" else running.ports.binance_futures
    _, prefix, symbol = MARKETS[market]
    channels = [TRADES, L2_BOOK, TICKER] + ([FUNDING] if market == "futures" else [])
    levels = running.daemon.config.markets["BTCUSDT"].depth_levels  # what pushd polls

    async def main() -> tuple[Seen, dict[str, Any], list[dict[str, Any]]]:
        seen = Seen()
        url = f"wss://127.0.0.1:{port}"
        cls = feed_class(market, url, running.http_url, certs.client_context())
        feed = cls(symbols=[symbol], channels=channels, callbacks=seen.callbacks())
        feed.start(asyncio.get_running_loop())
        try:
            await seen.until(lambda: len(seen.trades) >= TRADES_SEEN and seen.books
                             and seen.tickers and (market == "spot" or seen.funding))  # fmt: skip
            if restart is not None:
                trio.from_thread.run_sync(restart)
                await seen.until(lambda: seen.snapshots >= 2)
                reloaded = len(seen.books)
                await seen.until(lambda: len(seen.books) >= reloaded + 3)  # diffs again
            stop(stop_feed)  # then what pushd was told before reaches cryptofeed:
            engine = trio.from_thread.run_sync(simulated.book, "BTCUSDT", levels, 0)
            last_trade_id = simulated.books["BTCUSDT"].trade_id
            await seen.until(lambda: seen.caught_up(engine, last_trade_id))
            async with httpx.AsyncClient(base_url=running.http_url + prefix) as rest:
                while True:  # the book cryptofeed holds, at REST depth's lastUpdateId
                    depth = (await rest.get("/depth?symbol=BTCUSDT&limit=1000")).json()
                    last = depth["lastUpdateId"]
                    await seen.until(lambda last=last: seen.books[-1][0] >= last)
                    if seen.books[-1][0] == last:
                        break
                best = (Decimal(depth["bids"][0][0]), Decimal(depth["asks"][0][0]))
                await seen.until(lambda: (seen.tickers[-1].bid, seen.tickers[-1].ask) == best)
                agg = (await rest.get("/aggTrades?symbol=BTCUSDT&limit=1000")).json()
            return seen, depth, agg
        finally:
            feed.stop()
            await feed.shutdown()

    seen, depth, agg = await in_client_thread(main)
    update_id, book = seen.books[-1]
    assert update_id == depth["lastUpdateId"]
    assert book["bid"] == {Decimal(p): Decimal(q) for p, q in depth["bids"]}
    assert book["ask"] == {Decimal(p): Decimal(q) for p, q in depth["asks"]}
    assert len(book["bid"]) > 10 and len(book["ask"]) > 10
    assert max(book["bid"]) < min(book["ask"])
    rest_trades = {str(t["a"]): (Decimal(t["p"]), Decimal(t["q"])) for t in agg}
    held = seen.trades[-20:]
    assert all(t.symbol == symbol and rest_trades[t.id] == (t.price, t.amount) for t in held)
    assert all(t.symbol == symbol and t.bid < t.ask for t in seen.tickers)
    for funding in seen.funding:
        assert funding.symbol == symbol and funding.mark_price > 0
    return seen
