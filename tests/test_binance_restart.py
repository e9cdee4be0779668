"""The Binance surface's update ids across a restart and through ``pushd demo``: real daemons,
real sockets, the real ccxt on the URLs the demo prints."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import ccxt.pro as ccxtpro
import httpx
import trio
from conftest import Running, feed, make_config, open_client, start_daemon
from test_binance_ccxt import SURFACES

from ingest.sim import Market
from ingest.transport import serve_snapshots


async def depth_ids(running: Running, count: int) -> list[tuple[int, int]]:
    """(U, u) of the next ``count`` spot depth events."""
    url = f"ws://127.0.0.1:{running.ports.binance_spot}/ws/btcusdt@depth@100ms"
    async with open_client(url) as client:
        return [((m := await client.recv())["U"], m["u"]) for _ in range(count)]


async def test_update_ids_keep_rising_across_a_restart(nursery: trio.Nursery) -> None:
    market = Market(seed=3, rate=5)
    snapshot_port = await nursery.start(serve_snapshots, market.book, "127.0.0.1", 0)
    config = make_config(engine={"snapshot_enabled": True, "snapshot_port": snapshot_port},
                         binance=SURFACES)  # fmt: skip
    ids: list[list[tuple[int, int]]] = []
    for _ in range(2):  # the same engine, pushd restarted: a new epoch
        running = await start_daemon(nursery, config)
        feeding = trio.CancelScope()
        nursery.start_soon(_feed, running, market, feeding)
        ids.append(await depth_ids(running, 3))
        feeding.cancel()
        running.daemon.stop()
        await running.daemon.stopped.wait()
    before, after = ids
    for events in ids:  # spot's chain: U = previous u + 1, one id per event
        assert all(u == big_u for big_u, u in events)
        assert [u for _, u in events[1:]] == [u + 1 for _, u in events[:-1]]
    assert after[0][0] > before[-1][1]  # ccxt drops anything at or below its book's id


async def _feed(running: Running, market: Market, scope: trio.CancelScope) -> None:
    with scope:
        await feed(running, market)()


async def test_ccxt_on_the_urls_pushd_demo_prints(tmp_path: Path) -> None:
    config = tmp_path / "demo.toml"
    config.write_text(
        "[websocket]\nport = 0\n[http]\nport = 0\n[ingest]\ntcp_port = 0\nudp_port = 0\n"
        '[engine]\nsnapshot_port = 0\n[log]\nlevel = "error"\n'
        "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"
    )
    command = [sys.executable, "-m", "pushd", "demo", "--config", str(config), "--history-h", "0"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        printed = b""
        with trio.fail_after(30):
            while b"symbols" not in printed:
                chunk = await process.stdout.receive_some()
                assert chunk, printed
                printed += chunk
        text = printed.decode()
        spot_ws, spot_rest = re.search(r"Binance spot: (\S+)\s.*REST (\S+)", text).groups()  # type: ignore[union-attr]
        futures_ws, futures_rest = re.search(r"Binance USD-M: (\S+)\s.*REST (\S+)", text).groups()  # type: ignore[union-attr]
        async with httpx.AsyncClient() as http:
            info = (await http.get(f"{spot_rest}/exchangeInfo")).json()
        ticks = {s["symbol"]: s["filters"][0]["tickSize"] for s in info["symbols"]}
        assert ticks["BTCUSDT"] == "0.1"  # the simulator's, for the demo
        book = await trio.to_thread.run_sync(
            asyncio.run, _watch_book(spot_ws, spot_rest, futures_ws, futures_rest)
        )
        assert book["bids"] and book["asks"] and book["nonce"] > 0
    finally:
        process.terminate()
        await process.wait()


async def _watch_book(spot_ws: str, spot_rest: str, futures_ws: str, futures_rest: str) -> Any:
    ex = ccxtpro.binance()
    ex.urls["api"]["public"] = spot_rest
    ex.urls["api"]["fapiPublic"] = futures_rest
    ex.urls["api"]["dapiPublic"] = futures_rest.replace("/fapi/v1", "/dapi/v1")
    ex.urls["api"]["ws"]["spot"] = spot_ws
    ex.urls["api"]["ws"]["linear"] = futures_ws
    try:
        await ex.watch_order_book("BTC/USDT")
        return await ex.watch_order_book("BTC/USDT")
    finally:
        await ex.close()
