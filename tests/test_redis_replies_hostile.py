"""What the Redis bus reads back from its scripts is not trusted (review of issue 18, finding 2):
a state channel's meta hash planted with a state seq that is missing or not a number, or a seq
or an epoch no script wrote, ends no node. Its subscribers are told (a resync), a late joiner
gets ``recovered: false``, REST answers without a 500, and messages held while a gap is read
stay bounded. Real daemons on a private redis-server."""

from __future__ import annotations

from typing import Any

import coredis
import httpx
import msgspec
import pytest
import trio
from conftest import PUBLISH_TOKEN, make_config, open_client, start_daemon, subscribed
from redis_servers import RedisServer

from pushd.bus.control import ControlPlane
from pushd.bus.follower import MAX_HELD, Follower
from pushd.bus.lease import held_by_us
from pushd.bus.model import Outgoing
from pushd.bus.redis import RedisBus
from pushd.bus.store import META_TTL_S, Keys, decode_published, decode_recovered, lua_script
from pushd.channels import parse_internal
from pushd.config import BusConfig, RedisBusConfig
from pushd.errors import MalformedData
from pushd.gateway.hub import Hub, Outlet

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}
TICKER = "ticker_BTCUSDT"  # a whole-state stream: recover reads its stored state


def redis_client(url: str) -> Any:
    return coredis.Redis.from_url(url, decode_responses=False)


async def plant_state(url: str, channel: str, data: bytes) -> None:
    """A whole-state message, as the compute node publishes one (announced on pub/sub)."""
    keys = Keys("pushd", channel)
    async with redis_client(url) as client:
        await client.eval(
            lua_script("publish.lua"),
            keys=[keys.meta, keys.hist, keys.archive],
            args=[keys.pubsub, "planted0", 0, 300_000, META_TTL_S, "publish", "1", 10, data, b"",
                  b""],
        )  # fmt: skip


# what anyone with access to Redis can leave in a meta hash: fields no script wrote
BAD_META = {
    "ss-missing": {b"st": b'{"n":0}'},
    "ss-not-a-number": {b"st": b'{"n":0}', b"ss": b"abc"},
    "ss-a-fraction": {b"st": b'{"n":0}', b"ss": b"1.5"},
    "s-not-a-number": {b"s": b"many"},
    "epoch-not-text": {b"e": b'pl"a\xffnted'},
}


@pytest.mark.parametrize("fields", BAD_META.values(), ids=BAD_META.keys())
async def test_a_malformed_meta_hash_ends_no_node(
    nursery: trio.Nursery, fields: dict[bytes, bytes]
) -> None:
    with RedisServer() as redis:
        bus = {"kind": "redis", "redis": {"url": redis.url, "timeout_s": 1.0}}
        node = await start_daemon(nursery, make_config("gateway", bus=bus))
        keys = Keys("pushd", TICKER)
        async with open_client(node.ws_url) as client:
            reply = await client.call({"op": "subscribe", "channel": "BTCUSDT@ticker"})
            assert subscribed(reply, "BTCUSDT@ticker"), reply
            await plant_state(redis.url, TICKER, b'{"n":1}')
            event = await client.recv()
            assert (event["seq"], event["data"]) == (1, {"n": 1}), event
            epoch = event["epoch"]  # the node's subscribe made the numbering: not planted0
            async with redis_client(redis.url) as r:
                # the hash no longer holds what the scripts wrote; a message past a gap sends
                # the node to read it (a catch-up, with its own epoch as since)
                await r.hdel(keys.meta, [b"ss"])
                await r.hset(keys.meta, {b"s": b"5", **fields})
                await r.publish(keys.pubsub, b'["%s",5,[{"n":5}]]' % epoch.encode())
            told = await client.recv()  # the gap could not be filled: the subscriber is told
            assert told.get("resync") is True or told["data"] == {"n": 1}, told
            async with open_client(node.ws_url) as late:  # a joiner: since in the same epoch
                since = {"seq": 1, "epoch": epoch}
                reply = await late.call(
                    {"op": "subscribe", "channel": "BTCUSDT@ticker", "since": since}
                )
                assert subscribed(reply, "BTCUSDT@ticker"), reply
                assert reply["recovered"] is False, reply
            async with open_client(node.ws_url) as fresh:  # and one without since
                reply = await fresh.call({"op": "subscribe", "channel": "BTCUSDT@ticker"})
                assert subscribed(reply, "BTCUSDT@ticker"), reply
            async with httpx.AsyncClient() as http:
                for path in ("/v1/ticker", "/v1/depth"):
                    got = await http.get(f"{node.http_url}{path}", params={"symbol": "BTCUSDT"})
                    assert got.status_code < 500, (path, got.text)
            # the node lives and the channel goes on: the next state reaches the subscriber
            await plant_state(redis.url, TICKER, b'{"n":6}')
            while (event := await client.recv()).get("data") != {"n": 6}:
                assert event.get("resync") is True or "data" in event, event


class WatchedFollower(Follower):
    """The Redis bus's follower, telling the test when a message with a given seq has
    reached it."""

    def watch(self, seq: int) -> trio.Event:
        self._watched = (seq, trio.Event())
        return self._watched[1]

    def _on_message(self, channel: str, epoch: str, seq: int, data: msgspec.Raw) -> None:
        super()._on_message(channel, epoch, seq, data)
        watched = getattr(self, "_watched", None)
        if watched is not None and watched[0] == seq:
            watched[1].set()


class WatchedBus(RedisBus):
    follower_class = WatchedFollower


async def test_messages_held_while_a_gap_is_read_stay_bounded(nursery: trio.Nursery) -> None:
    """A catch-up that takes long (Redis slow to answer) holds the channel's live messages:
    past ``MAX_HELD`` the oldest held are dropped (a gap the stream's own checks then fill or
    tell), and when the catch-up ends the subscriber is told and the stream is whole again."""
    with RedisServer() as redis:
        config = BusConfig(kind="redis", redis=RedisBusConfig(url=redis.url, timeout_s=1.0))
        hub = Hub()
        bus = WatchedBus(hub, config)
        follower = bus.follower
        assert isinstance(follower, WatchedFollower)
        await nursery.start(bus.run)
        outlet = Outlet(1 << 20)
        hub.subscribe(outlet, parse_internal("notice", frozenset()))
        bus.interest("notice")
        await bus.wait_ready()
        arrived = follower.watch(1)
        [first] = await bus.publish_confirmed([Outgoing("notice", msgspec.Raw(b"1"))])
        with trio.fail_after(5):
            await arrived.wait()
        feed = follower._feeds["notice"]
        assert feed.position == first
        outlet.out.clear()
        feed.held = []  # as if a catch-up were under way, slow to get its answer
        count = MAX_HELD + 100
        arrived = follower.watch(first.seq + count)
        last = (await bus.publish_confirmed([Outgoing("notice", msgspec.Raw(b"2"))] * count))[-1]
        with trio.fail_after(10):  # every one of them reached the node (and was held)
            await arrived.wait()
        assert feed.held is not None and feed.held[-1][1] == last.seq
        assert len(feed.held) <= MAX_HELD
        await follower._catch_up("notice", feed)
        assert feed.held is None and feed.position == last
        frame = msgspec.json.decode(bytes(outlet.out)[2:])
        assert (frame.get("resync"), frame["seq"]) == (True, last.seq), frame


def test_each_script_reply_is_read_in_one_place() -> None:
    """A reply of another shape is malformed data (or no lease), never an unpacking error."""
    assert decode_published([b"e1", 7]) == ("e1", 7)
    assert decode_recovered([b"e1", 3, None, None, None]).entries is None
    for bad in ([b"e1"], [b"e1", b"7"], None, [b"e1", 7, 1]):
        with pytest.raises(MalformedData):
            decode_published(bad)
    for bad in ([b"e1", 3], [b"e1", 3, b"2", b"{}", []], [b"e1", None, None, None, []]):
        with pytest.raises(MalformedData):
            decode_recovered(bad)
    assert held_by_us(1) and held_by_us(2)  # renewed, taken now
    assert not any(held_by_us(reply) for reply in (0, 3, b"1", "1", True, None, [1]))


# counters a node of another version, or anyone who can write to Redis, may answer with
ODD_COUNTERS = {"connections": None, "channels": "many", "subscriptions": [1], "published": {},
                "delivered": "1.5", "dropped": True, "flush_stall_max_ms": "slow",
                "flush_round_max_ms": None}  # fmt: skip


async def test_a_node_answering_odd_counters_costs_stats_no_500(nursery: trio.Nursery) -> None:
    """``/v1/stats`` sums what every node answers, read back from Redis: a node whose counters
    are not numbers is listed as it answered and counts nothing in the sums (as a kick counts
    only the answers that are counts), never a 500 that hides the other nodes."""
    with RedisServer() as redis:
        bus_cfg = BusConfig(kind="redis", redis=RedisBusConfig(url=redis.url, timeout_s=1.0))
        node = await start_daemon(nursery, make_config("gateway", bus=msgspec.to_builtins(bus_cfg)))
        odd_bus = RedisBus(Hub(), bus_cfg)
        await nursery.start(odd_bus.run)
        odd = ControlPlane(odd_bus, "gateway", lambda: ODD_COUNTERS, lambda _uid: 0, lambda _: 0)
        await nursery.start(odd.run)  # in the registry
        assert node.daemon.redis is not None
        with trio.fail_after(10):  # both listen to the control channel
            await odd_bus.wait_ready()
            await node.daemon.redis.wait_ready()
        async with httpx.AsyncClient(base_url=node.http_url, headers=AUTH) as http:
            got = await http.get("/v1/stats")
        assert got.status_code == 200, got.text
        answer = got.json()
        assert len(answer["nodes"]) == 2, answer
        listed = {n["node"]: n for n in answer["nodes"]}
        assert node.daemon.control is not None
        mine = listed[node.daemon.control.node_id]  # what the well node answered
        for key in ("connections", "channels", "subscriptions", "published", "delivered",
                    "dropped", "flush_stall_max_ms", "flush_round_max_ms"):  # fmt: skip
            assert answer[key] == mine[key], (key, answer)
        assert listed[odd.node_id]["connections"] is None  # listed as it answered


async def test_a_malformed_publish_reply_fails_its_batch_and_ends_no_node(
    nursery: trio.Nursery,
) -> None:
    """No real Redis answers ``publish.lua`` out of shape, a broken or impostor server can
    (here: the script's SHA pointed at one that answers ``{1, 2}``). The batch may have been
    published already, so it is not sent again: its waiters are told (503), the script is
    loaded afresh, and the next publish goes through; the node runs on."""
    with RedisServer() as redis:
        bus = {"kind": "redis", "redis": {"url": redis.url, "timeout_s": 1.0}}
        node = await start_daemon(nursery, make_config("gateway", bus=bus))
        await node.publish("notice", {"n": 1})
        async with redis_client(redis.url) as r:
            impostor = await r.script_load("return {1, 2}")
        node.daemon.backplane.bus.publisher._publish_sha = impostor  # type: ignore[attr-defined]
        async with httpx.AsyncClient() as http:
            refused = await http.post(f"{node.http_url}/v1/publish", headers=AUTH,
                                      json={"channel": "notice", "data": {"n": 2}})  # fmt: skip
        assert refused.status_code == 503, refused.text
        assert await node.publish("notice", {"n": 3}) == 2
