"""The Binance surfaces under ``pushd run --workers N``: every gateway process serves them on
the one port (SO_REUSEPORT; port 0 is chosen and held by the supervisor, as the WebSocket
port is), and a Binance client gets trades from whichever worker the kernel gave it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import open_client
from redis_servers import RedisServer
from test_workers import AUTH, supervisor

from ingest import wire
from ingest.sim_engine import SOURCE_MARKET
from ingest.transport import UdpSender

CLIENTS = 16  # all on one of two workers: 2 in 2**16


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


async def test_binance_clients_get_trades_from_every_worker(
    tmp_path: Path, server: RedisServer
) -> None:
    got = await from_every_worker(tmp_path, server, "/ws/btcusdt@trade", 0.5)
    assert all(t["e"] == "trade" and t["s"] == "BTCUSDT" and t["p"] == "65000.5" for t in got)


async def test_all_market_arrays_from_every_worker(tmp_path: Path, server: RedisServer) -> None:
    """``!miniTicker@arr`` under ``--workers``: each gateway process taps the ticker channels it
    follows in Redis and sends its own clients the arrays, whichever worker has them."""
    got = await from_every_worker(tmp_path, server, "/ws/!miniTicker@arr", 0.1)
    assert all(a[0]["e"] == "24hrMiniTicker" and a[0]["c"] == "65000.5" for a in got)
    assert all([t["s"] for t in a] == ["BTCUSDT"] for a in got)  # only what changed


async def from_every_worker(
    tmp_path: Path, server: RedisServer, path: str, every_s: float
) -> list[Any]:
    """The first message of each of CLIENTS clients of ``path`` on the workers' one Binance
    port, the engine sending a BTCUSDT trade each ``every_s`` until it comes (until its worker
    follows the channel in Redis); the clients were spread over both workers."""
    extra = "[binance.spot]\nenabled = true\nport = 0\n"
    async with supervisor(tmp_path, server, workers=2, extra=extra) as (_, logs, _ws, http_port):
        ready = await logs.until("pushd ready", 3)
        ports = {line["binance_spot"] for line in ready if line["websocket"]}
        assert len(ports) == 1 and 0 not in ports  # one port, shared
        [port] = ports
        [compute] = [line for line in ready if not line["websocket"]]
        engine = UdpSender("127.0.0.1", compute["ingest_udp"], SOURCE_MARKET)
        async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            trade_ids = iter(range(1, 10**6))
            got = []
            with trio.fail_after(60):
                for _ in range(CLIENTS):
                    client = await nursery.start(hold, f"ws://127.0.0.1:{port}{path}")
                    while True:
                        trade = wire.Trade("BTCUSDT", next(trade_ids), "65000.5", "0.25",
                                           "buy", 1_795_000_000_000)  # fmt: skip
                        await engine.send([trade])
                        with trio.move_on_after(every_s):
                            got.append(await client.recv())
                            break
            stats = (await http.get(f"http://127.0.0.1:{http_port}/v1/stats", headers=AUTH)
                     ).json()  # fmt: skip
            nursery.cancel_scope.cancel()
        engine.close()
    counts = [n["surfaces"]["binance_spot"] for n in stats["nodes"] if n["role"] == "gateway"]
    assert len(counts) == 2 and sum(counts) == CLIENTS and min(counts) > 0
    return got


async def hold(url: str, task_status: trio.TaskStatus[object]) -> None:
    async with open_client(url) as client:
        task_status.started(client)
        await trio.sleep_forever()
