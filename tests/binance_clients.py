"""What the tests of the real Binance clients share (python-binance, cryptofeed,
binance-sdk-spot: tests/test_binance_<client>.py): a daemon with both Binance surfaces on a
simulated market, the simulated feed that the client's side can stop, and a run of the
client's asyncio code in a worker thread (each client has its own event loop; the daemon and
the feed run on Trio here)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
from conftest import Running, feed, make_config, start_daemon

from ingest import wire
from ingest.sim import Market
from ingest.transport import BookProvider, serve_snapshots

CLIENT_TIMEOUT_S = 25  # what one client's run may take at most


async def start_surfaces(
    nursery: trio.Nursery,
    market: Market,
    provider: BookProvider | None = None,
    **sections: dict[str, Any],
) -> Running:
    """A daemon on ``market``'s books (through ``provider``, if given) with the spot and USD-M
    surfaces on free ports; ``spot``/``futures``/``http`` add keys to those sections (``tls``
    for wss://)."""
    snapshot_port = await nursery.start(serve_snapshots, provider or market.book, "127.0.0.1", 0)
    binance = {side: {"enabled": True, "port": 0, **sections.pop(side, {})}
               for side in ("spot", "futures")}  # fmt: skip
    engine = {"snapshot_enabled": True, "snapshot_port": snapshot_port}
    return await start_daemon(nursery, make_config(engine=engine, binance=binance, **sections))


async def start_fed(
    nursery: trio.Nursery,
    market: Market,
    provider: BookProvider | None = None,
    **sections: dict[str, Any],
) -> tuple[Running, Callable[[], None]]:
    """``start_surfaces`` with ``market``'s feed running into it, and what stops the feed."""
    running = await start_surfaces(nursery, market, provider, **sections)
    return running, start_feed(nursery, running, market)


def restartable(market: Market) -> tuple[BookProvider, Callable[[], None]]:
    """An engine whose book versions start far up and drop to the simulator's own when it
    restarts (call the second from the client's thread with ``trio.from_thread``): pushd
    resyncs with a snapshot Binance clients are not sent, a break in the diff chain."""
    offset = [10**9]

    def provider(symbol: str, depth: int, request_id: int) -> wire.BookSnapshot:
        book = market.book(symbol, depth, request_id)
        return msgspec.structs.replace(book, update_id=book.update_id + offset[0])

    def restart() -> None:
        offset[0] = 0

    return provider, restart


def start_feed(nursery: trio.Nursery, running: Running, market: Market) -> Callable[[], None]:
    """Feeds ``market``'s events into ``running``; returns what halts the market, to call from
    the client's thread (``trio.from_thread.run_sync``). Halted, not cancelled: a feed cancelled
    between two datagrams of a step would leave the market ahead of what pushd was told."""
    nursery.start_soon(feed(running, market))
    return market.halt


def stop(stop_feed: Callable[[], None]) -> None:
    """From the client's thread: the market halts, the books and the tape stand still. What
    the feed sent before still reaches the clients afterwards (the trades pushd flushes every
    ``trades_interval_ms``, the book its next poll finds): wait for the market's last trade and
    book before taking REST's answers as final."""
    trio.from_thread.run_sync(stop_feed)


async def in_client_thread(main: Callable[[], Awaitable[Any]]) -> Any:
    """Runs the coroutine function ``main`` on a fresh asyncio loop in a worker thread, for
    at most CLIENT_TIMEOUT_S (timed out on its own loop: Trio cannot cancel a thread)."""

    async def bounded() -> Any:
        return await asyncio.wait_for(main(), CLIENT_TIMEOUT_S)

    return await trio.to_thread.run_sync(asyncio.run, bounded())
