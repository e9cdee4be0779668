"""The Binance surfaces in the node's gauges and stats: a Binance connection is counted by its
surface (``pushd_connections{surface}``, ``pushd_connections_open{surface}``,
``pushd_bytes_sent_total{surface}``, ``/v1/stats`` ``connections`` and ``surfaces``)."""

from __future__ import annotations

import httpx
import trio
from conftest import PUBLISH_TOKEN, make_config, open_client, start_daemon
from scrape import Scrape

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


async def test_binance_connections_are_counted_by_surface(nursery: trio.Nursery) -> None:
    config = make_config(binance={"spot": {"enabled": True, "port": 0},
                                  "futures": {"enabled": True, "port": 0}})  # fmt: skip
    running = await start_daemon(nursery, config)
    url = f"ws://127.0.0.1:{running.ports.binance_spot}/ws"
    async with open_client(url) as spot, httpx.AsyncClient() as http:
        assert await spot.call({"method": "LIST_SUBSCRIPTIONS", "id": 1}) == {"result": [], "id": 1}
        metrics = Scrape((await http.get(f"{running.http_url}/metrics")).text)
        stats = (await http.get(f"{running.http_url}/v1/stats", headers=AUTH)).json()
    opened = {s: metrics.value("pushd_connections_open", surface=s)
              for s in ("native", "binance_spot", "binance_futures")}  # fmt: skip
    assert opened == {"native": 0, "binance_spot": 1, "binance_futures": 0}
    assert metrics.value("pushd_connections", surface="binance_spot", state="open") == 1
    assert metrics.value("pushd_bytes_sent_total", surface="binance_spot") > 0
    assert stats["connections"] == 1
    assert stats["surfaces"] == {"native": 0, "binance_spot": 1, "binance_futures": 0}
