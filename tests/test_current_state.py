"""One source of current state (issue 20, item 6): a REST snapshot is what a fresh subscriber's
first event is, the same data at the same position (epoch and seq), for depth, ticker,
markPrice and the open candle. On the memory bus (one process: the books are here) and on Redis
from a gateway-role node with no book in its process (the compute node's stored states): both
read the node's backplane (``pushd.bus.backplane``)."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from conftest import Running, feed, open_client, start_daemon, start_simulated, subscribed
from redis_servers import Redis
from test_cluster import redis_config
from test_state_first import recv_event

from ingest.sim import Market
from ingest.transport import serve_snapshots

SYMBOL = "BTCUSDT"
STREAMS = ("depth", "ticker", "markPrice", "kline")
REST = {"depth": "/v1/depth", "ticker": "/v1/ticker", "markPrice": "/v1/markPrice",
        "kline": "/v1/klines"}  # fmt: skip


async def rest_state(http: httpx.AsyncClient, stream: str) -> dict[str, Any]:
    """The REST snapshot of ``stream``: its position, and the state a subscriber starts from
    (for klines, the last candle of the list)."""
    params: dict[str, Any] = {"symbol": SYMBOL}
    if stream == "depth":
        params["limit"] = 5000  # the whole book, as the first event has it
    answer = (await http.get(REST[stream], params=params)).json()
    data = answer["data"]
    if stream == "kline":
        data = data[-1] if data else None
    return {"epoch": answer["epoch"], "seq": answer["seq"], "data": data}


async def first_event(node: Running, stream: str) -> dict[str, Any]:
    channel = f"{SYMBOL}@{stream}"
    async with open_client(node.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": channel}), channel)
        event = await recv_event(client)
    assert event["event"] == channel, event
    return {"epoch": event["epoch"], "seq": event["seq"], "data": event["data"]}


async def wait_for_states(node: Running) -> None:
    """Until each stream has had an event on ``node`` (from then on it has a state)."""
    channels = [f"{SYMBOL}@{stream}" for stream in STREAMS]
    seen: set[str] = set()
    async with open_client(node.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": channels}), *channels)
        with trio.fail_after(60):
            while seen != set(channels):
                seen.add((await recv_event(client))["event"])


async def assert_rest_is_the_first_event(node: Running) -> None:
    """For each stream, a REST snapshot, a fresh subscriber, a REST snapshot again: where the
    two snapshots are the same (nothing was published between), the subscriber's first event
    is that snapshot. Every stream is checked at least twice."""
    agreed = dict.fromkeys(STREAMS, 0)
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        with trio.fail_after(60):
            while min(agreed.values()) < 2:
                for stream in STREAMS:
                    before = await rest_state(http, stream)
                    first = await first_event(node, stream)
                    if before == await rest_state(http, stream):
                        assert first == before, (stream, first, before)
                        agreed[stream] += 1


async def test_rest_is_the_first_event_on_the_memory_bus(nursery: trio.Nursery) -> None:
    market = Market(seed=5)
    node = await start_simulated(nursery, market)
    async with trio.open_nursery() as engine:
        engine.start_soon(feed(node, market))
        await wait_for_states(node)
        engine.cancel_scope.cancel()  # the book stands still: most rounds publish nothing
    await assert_rest_is_the_first_event(node)


async def test_rest_is_the_first_event_on_a_gateway_without_the_book(
    nursery: trio.Nursery, redis: Redis
) -> None:
    market = Market(seed=6)
    snapshot_port = await nursery.start(serve_snapshots, market.book, "127.0.0.1", 0)
    engine_cfg = {"snapshot_enabled": True, "snapshot_port": snapshot_port}
    compute = await start_daemon(nursery, redis_config(redis, "compute", engine=engine_cfg))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    async with trio.open_nursery() as engine:
        engine.start_soon(feed(compute, market))
        await wait_for_states(gateway)
        engine.cancel_scope.cancel()
    assert not gateway.daemon.markets.symbols[SYMBOL].depth.ready  # no book in its process
    await assert_rest_is_the_first_event(gateway)
