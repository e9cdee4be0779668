"""A gateway follows a channel in Redis exactly while its hub wants it (issue 19, items 1 and 5):
unsubscribe and subscribe back to back, from one client or several, never leave a channel
that Redis delivers and the node ignores; every subscription sits on the connection it
belongs to, as Redis itself reports it. Real redis-server (and a 3-node Cluster), real nodes."""

from __future__ import annotations

import subprocess
from typing import Any

import trio
from conftest import Running, open_client, start_daemon, subscribed
from redis_servers import REDIS_CLI, Redis, RedisCluster
from test_cluster import publish, redis_config


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

        for client in clients:
            assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        for turn in range(8):  # each turn the node's last subscriber leaves and one comes back
            *others, last = clients[turn % count :] + clients[: turn % count]
            for client in others:
                await client.call({"op": "unsubscribe", "channel": "notice"})
            await resubscribe_at_once(last)  # the node's last subscriber, back at once
            async with trio.open_nursery() as storm:  # then the others, all together
                for client in others:
                    storm.start_soon(client.call, {"op": "subscribe", "channel": "notice"})
            await publish(compute, "notice", {"n": turn})  # and every client gets it live
            with trio.fail_after(5):
                for client in clients:
                    while (message := await client.recv()).get("event") != "notice":
                        pass
                    assert message["data"] == {"n": turn}
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


async def assert_carried(node: Running, redis: Redis, via: dict[int, int] | None = None) -> None:
    """What the node says it follows, and on which connection, is what Redis has: each
    followed channel subscribed on exactly the connection named for it, and no other
    connection of this node subscribed to anything but the control channel. ``via``: the
    port of the server behind each proxy port the node connects to."""
    via = via or {}
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
            if via.get(carrier.port, carrier.port) == server.port:
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
            if via.get(carrier.port, carrier.port) == server.port
        }
        assert set(on_server) == expected_channels


async def test_an_unconfirmed_subscribe_leaves_no_subscription_behind(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """Issue 19, item 5: Redis does not confirm a SUBSCRIBE in time (paused, as a half-open
    link is): the node drops that pub/sub connection with every subscription on it and
    subscribes again on a new one. Afterwards Redis holds, over all of the nodes'
    connections, exactly what the hubs want plus one control subscription per node; and
    the control link, listened to again, carries only the control channel."""
    compute = await start_daemon(nursery, redis_config(redis, "compute"))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    bus = gateway.daemon.redis
    assert bus is not None
    async with open_client(gateway.ws_url) as client:
        channels = ["notice", "BTCUSDT@trades", "ETHUSDT@trades"]
        assert subscribed(await client.call({"op": "subscribe", "channel": channels}), *channels)
        server = redis.owner("SOLUSDT@trades") if isinstance(redis, RedisCluster) else redis
        redis_cli(server.port, "CLIENT", "PAUSE", "2500", "ALL")
        request = {"op": "subscribe", "channel": "SOLUSDT@trades"}
        with trio.fail_after(20):  # while the node resubscribes, it says so (13): retried
            while (reply := await client.call(request)).get("code") == 13:
                pass
        assert subscribed(reply, "SOLUSDT@trades"), reply
        await live(client, compute, 1)  # the old channels still live on the new connection
        await settled_in_redis(redis)  # no leftover of the dropped connection
        for n in (compute, gateway):  # the control links are listened to again
            assert n.daemon.redis is not None
            for server in redis.nodes if isinstance(redis, RedisCluster) else [redis]:
                for client_id, fields in client_list(server.port).items():
                    if fields.get("name") == n.daemon.redis.control_name:
                        redis_cli(server.port, "CLIENT", "KILL", "ID", str(client_id))
        await settled_in_redis(redis)  # control listened to again, on a connection of its own
        await assert_carried(gateway, redis)


async def settled_in_redis(redis: Redis, channels: int = 4, control: int = 2) -> None:
    """Until Redis holds the gateway's ``channels`` and one control subscription per node
    (``control``), and nothing else (Redis has no event to await for this: it is polled)."""
    with trio.fail_after(10):
        while subscriptions(redis) != (channels, control):  # noqa: ASYNC110
            await trio.sleep(0.05)


def subscriptions(redis: Redis) -> tuple[int, int]:
    """(channel subscriptions, control subscriptions) over every connection Redis has."""
    servers = redis.nodes if isinstance(redis, RedisCluster) else [redis]
    channels = control = 0
    for server in servers:
        for fields in client_list(server.port).values():
            channels += int(fields.get("ssub", 0)) + int(fields.get("sub", 0))
        numsub = redis_cli(server.port, "PUBSUB", "NUMSUB", "pushd:control").split()
        control += int(numsub[1])
    return channels - control, control
