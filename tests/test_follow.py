"""A gateway follows a channel in Redis exactly while its hub wants it (issue 19, items 1 and 5):
unsubscribe and subscribe back to back, from one client or several, never leave a channel
that Redis delivers and the node ignores; every subscription sits on the connection it
belongs to, as Redis itself reports it. Real redis-server (and a 3-node Cluster), real nodes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from conftest import Running, open_client, start_daemon, subscribed
from redis_servers import REDIS_CLI, RedisCluster, RedisServer
from test_cluster import publish, redis_config

Redis = RedisServer | RedisCluster


@pytest.fixture(params=["redis", "redis-cluster"])
def redis(request: pytest.FixtureRequest) -> Iterator[Redis]:
    server = RedisServer() if request.param == "redis" else RedisCluster()
    with server:
        yield server


async def live(client: Any, node: Running, n: int) -> None:
    """Publish ``n`` on ``notice`` from ``node`` and await it on ``client`` (live, not replay)."""
    await publish(node, "notice", {"n": n})
    with trio.fail_after(5):
        while True:
            message = await client.recv()
            if message.get("event") == "notice" and message["data"] == {"n": n}:
                return


async def resubscribe_at_once(client: Any) -> None:
    """Unsubscribe and subscribe in one write, as a depth client does after a resync notice."""
    await client.send({"op": "unsubscribe", "channel": "notice", "id": 1})
    await client.send({"op": "subscribe", "channel": "notice", "id": 2})
    with trio.fail_after(5):
        while (reply := await client.recv()).get("id") != 2:
            pass
    assert subscribed(reply, "notice"), reply


async def test_unsubscribe_then_subscribe_at_once_keeps_the_channel_live(
    nursery: trio.Nursery, redis: Redis
) -> None:
    compute = await start_daemon(nursery, redis_config(redis, "compute"))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        await live(client, compute, 0)
        for n in range(1, 6):  # N times in a row: each time the channel stays live
            await resubscribe_at_once(client)
            await live(client, compute, n)
        async with open_client(gateway.ws_url) as later:  # and so for a later subscriber
            assert subscribed(await later.call({"op": "subscribe", "channel": "notice"}), "notice")
            await live(later, compute, 100)
    await assert_carried(gateway, redis)


async def test_resubscribe_storm_from_several_clients(nursery: trio.Nursery, redis: Redis) -> None:
    compute = await start_daemon(nursery, redis_config(redis, "compute"))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    count = 4
    async with (
        open_client(gateway.ws_url) as c0,
        open_client(gateway.ws_url) as c1,
        open_client(gateway.ws_url) as c2,
        open_client(gateway.ws_url) as c3,
    ):
        clients = [c0, c1, c2, c3]

        async def storm(client: Any) -> None:
            for _ in range(8):
                await resubscribe_at_once(client)
                await client.call({"op": "unsubscribe", "channel": "notice"})
            await resubscribe_at_once(client)

        async with trio.open_nursery() as storms:
            for client in clients:
                storms.start_soon(storm, client)
        for n in range(3):
            await publish(compute, "notice", {"n": n})
        with trio.fail_after(10):
            for client in clients:
                got = []
                while len(got) < 3:
                    message = await client.recv()
                    if message.get("event") == "notice":
                        got.append(message["data"]["n"])
                assert got == [0, 1, 2]
        assert gateway.daemon.hub.subscriber_count("notice") == count
        await assert_carried(gateway, redis)


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout  # fmt: skip


def client_list(port: int) -> dict[int, dict[str, str]]:
    clients = {}
    for line in redis_cli(port, "CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        clients[int(fields["id"])] = fields
    return clients


async def assert_carried(node: Running, redis: Redis) -> None:
    """What the node says it follows, and on which connection, is what Redis has: each
    followed channel subscribed on exactly the connection named for it, and no other
    connection of this node subscribed to anything but the control channel."""
    bus = node.daemon.redis
    assert bus is not None
    with trio.fail_after(5):
        await bus.settled()
    carriers = bus.carriers()
    assert set(carriers) == set(node.daemon.hub.channels())
    servers = redis.nodes if isinstance(redis, RedisCluster) else [redis]
    field = "ssub" if isinstance(redis, RedisCluster) else "sub"
    for server in servers:
        listed = client_list(server.port)
        mine = {i: c for i, c in listed.items() if c.get("name", "").startswith(bus.name)}
        expected = {
            i: 0 for i, c in mine.items() if c["name"] != bus.control_name
        }  # this node's connections with no channel: none subscribed
        for carrier in carriers.values():
            if carrier.port == server.port:
                expected[carrier.client_id] = expected.get(carrier.client_id, 0) + 1
        for client_id, channels in expected.items():
            assert client_id in mine, f"{client_id} is not a connection of this node in Redis"
            assert int(mine[client_id][field]) == channels, (client_id, mine[client_id])
            assert mine[client_id]["name"] == bus.data_name or channels == 0
        for fields in mine.values():
            if fields["name"] == bus.control_name:  # the control link: its one channel only
                assert (int(fields["sub"]), int(fields["ssub"])) == (1, 0), fields
        on_server = redis_cli(server.port, "PUBSUB", "SHARDCHANNELS" if field == "ssub" else
                              "CHANNELS", f"{bus.prefix}:{{*").split()  # fmt: skip
        expected_channels = {
            f"{bus.prefix}:{{{c}}}"
            for c, carrier in carriers.items()
            if carrier.port == server.port
        }
        assert set(on_server) == expected_channels
