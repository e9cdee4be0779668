"""Hostile publishes and what a bus hands back: no input ends a node, no seq is given to a
message that cannot be delivered, a batch is all or nothing, and data read back from Redis is
never trusted to be well-formed (issue 18, item 2). Real daemons on real sockets, a real
redis-server for the Redis bus, and a sans-IO check of the hub's last-resort boundary."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import coredis
import httpx
import msgspec
import pytest
import trio
from conftest import PUBLISH_TOKEN, Running, make_config, open_client, start_daemon, subscribed
from hypothesis import example, given
from hypothesis import strategies as st
from redis_servers import RedisServer
from structlog.testing import capture_logs
from test_fuzz import FUZZ, Daemon, Surface, client_frame, read_text_frame, run_daemon, ws_connect

from pushd.bus.store import META_TTL_S, Keys, lua_script
from pushd.channels import parse_internal
from pushd.gateway.hub import Hub, Outlet

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}", "content-type": "application/json"}
# invalid UTF-8 inside a JSON string: well-formed JSON to a parser that does not check UTF-8
BAD_DATA = b'"\xff\xfe"'


@pytest.fixture(params=["memory", "redis"])
async def node(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Running]:
    """One daemon on each bus (the Redis one on a private redis-server)."""
    if request.param == "memory":
        yield await start_daemon(nursery, make_config())
        return
    with RedisServer() as redis:
        bus = {"kind": "redis", "redis": {"url": redis.url, "timeout_s": 1.0}}
        running = await start_daemon(nursery, make_config(bus=bus))
        running.redis_url = redis.url  # type: ignore[attr-defined]
        yield running


async def post(node: Running, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{node.http_url}{path}", content=body, headers=AUTH)


async def test_invalid_utf8_is_refused_before_a_seq_is_taken(node: Running) -> None:
    """On both buses: 400, no seq spent, no hole for live subscribers or for ``since``, and a
    batch with one bad message publishes none of it."""
    async with open_client(node.ws_url) as client:
        reply = await client.call({"op": "subscribe", "channel": "notice"})
        assert subscribed(reply, "notice")
        first = await node.publish("notice", {"n": 1})
        bad = await post(node, "/v1/publish", b'{"channel":"notice","data":' + BAD_DATA + b"}")
        assert bad.status_code == 400, bad.text
        assert "UTF-8" in bad.json()["error"]
        batch = (b'{"messages":[{"channel":"notice","data":{"n":99}},'
                 b'{"channel":"notice","data":{"s":' + BAD_DATA + b"}}]}")  # fmt: skip
        bad = await post(node, "/v1/publish/batch", batch)
        assert bad.status_code == 400, bad.text
        second = await node.publish("notice", {"n": 2})
        assert second == first + 1  # neither refusal spent a seq
        seen = [await client.recv(), await client.recv()]
        assert [(e["seq"], e["data"]) for e in seen] == [(first, {"n": 1}), (second, {"n": 2})]
        epoch = seen[0]["epoch"]
    async with open_client(node.ws_url) as late:
        since = {"seq": first - 1, "epoch": epoch}
        reply = await late.call({"op": "subscribe", "channel": "notice", "since": since})
        assert reply["recovered"] is True, reply
        assert [(await late.recv())["data"]["n"] for _ in range(2)] == [1, 2]


async def plant(redis_url: str, channel: str, data: bytes, *, announce: bool) -> None:
    """What any process with access to the shared Redis can do: run the publish script with
    data that is not UTF-8. ``announce``: on the channel's pub/sub channel (else on one no node
    follows, so nodes find the message only in history, through a gap)."""
    keys = Keys("pushd", channel)
    pubsub = keys.pubsub if announce else f"{keys.pubsub}:nobody"
    client: Any = coredis.Redis.from_url(redis_url, decode_responses=False)
    async with client:
        await client.eval(
            lua_script("publish.lua"),
            keys=[keys.meta, keys.hist, keys.archive],
            args=[pubsub, "planted0", 200, 300_000, META_TTL_S, "publish", "0", 10, data, b"", b""],
        )


@pytest.mark.parametrize("announce", [True, False], ids=["live", "catch-up"])
async def test_a_malformed_message_from_redis_ends_no_node(
    nursery: trio.Nursery, announce: bool
) -> None:
    """A message planted in Redis (history and pub/sub, or history only, reached through the
    gap it leaves): the node lives, the subscriber is told (a resync notice at its seq), the
    stream goes on, and a ``since`` across it is ``recovered: false``, not a closed socket."""
    with RedisServer() as redis:
        bus = {"kind": "redis", "redis": {"url": redis.url, "timeout_s": 1.0}}
        running = await start_daemon(nursery, make_config(bus=bus))
        async with open_client(running.ws_url) as client:
            assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
            first = await running.publish("notice", {"n": 1})
            assert (await client.recv())["data"] == {"n": 1}
            await plant(redis.url, "notice", BAD_DATA, announce=announce)
            third = await running.publish("notice", {"n": 3})
            assert third == first + 2
            notice = await client.recv()
            assert notice["resync"] is True, notice
            if announce:  # dropped as it came: the notice is for it alone
                assert notice["seq"] == first + 1, notice
                event = await client.recv()
                assert (event["seq"], event["data"]) == (third, {"n": 3})
            else:  # a gap history could not fill: the notice covers it and what came with it
                assert notice["seq"] == third, notice
            fourth = await running.publish("notice", {"n": 4})
            event = await client.recv()
            assert (event["seq"], event["data"]) == (fourth, {"n": 4})
            epoch = event["epoch"]
        async with open_client(running.ws_url) as late:
            since = {"seq": first, "epoch": epoch}
            reply = await late.call({"op": "subscribe", "channel": "notice", "since": since})
            assert reply["recovered"] is False, reply
            await running.publish("notice", {"n": 5})
            assert (await late.recv())["data"] == {"n": 5}  # live after it
        async with open_client(running.ws_url) as late:
            since = {"seq": first + 1, "epoch": epoch}  # after the planted one: exact again
            reply = await late.call({"op": "subscribe", "channel": "notice", "since": since})
            assert reply["recovered"] is True, reply
            assert [(await late.recv())["data"]["n"] for _ in range(3)] == [3, 4, 5]


def test_the_hub_drops_an_undeliverable_message_with_a_resync_notice() -> None:
    """The last boundary, whatever bus fed it: a message whose data cannot be framed reaches
    nobody, its subscribers (live and joining) are told, and the stream goes on."""
    hub = Hub()
    channel = parse_internal("notice", frozenset())
    live, joining = Outlet(1 << 20), Outlet(1 << 20)
    hub.subscribe(live, channel)
    hub.join(joining, channel)
    assert hub.publish("notice", "e1", 1, msgspec.Raw(b"1")) == 1
    assert hub.publish("notice", "e1", 2, msgspec.Raw(BAD_DATA)) is None
    assert hub.publish("notice", "e1", 3, msgspec.Raw(b"3")) == 0  # lagging until drained
    hub.settle(joining, channel, None)
    assert msgspec.json.decode(bytes(live.out)[2:])["seq"] == 1  # one frame: 1 only
    live.out.clear()
    hub.drained(live)  # its buffer emptied: told what it lost, 2 (undeliverable) and 3
    assert msgspec.json.decode(bytes(live.out)[2:]) == {
        "event": "notice", "resync": True, "seq": 3, "epoch": "e1"}  # fmt: skip
    told = bytes(joining.out)  # what was kept for it, the notice in its place, told once
    assert told.index(b'"seq":1,') < told.index(b'"resync":true,"seq":2,') < told.index(b'"seq":3,')
    assert told.count(b'"resync"') == 1
    joining.out.clear()
    hub.drained(joining)
    assert joining.out == b""
    live.out.clear()
    joining.out.clear()
    assert hub.publish("notice", "e1", 4, msgspec.Raw(b"4")) == 2
    assert hub.undeliverable == 1


# -- fuzz: publish encodings, through a real process, on both buses ----------------------------


@pytest.fixture(scope="module")
def memory_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from run_daemon(tmp_path_factory.mktemp("publish-memory"))


@pytest.fixture(scope="module")
def redis_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with RedisServer() as redis:
        extra = f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = '{redis.url}'\n"
        yield from run_daemon(tmp_path_factory.mktemp("publish-redis"), extra)


@pytest.fixture(params=["memory", "redis"])
def daemon(request: pytest.FixtureRequest) -> Daemon:
    chosen: Daemon = request.getfixturevalue(f"{request.param}_daemon")
    return chosen


def utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_publish_encodings_fuzz(daemon: Daemon) -> None:
    """Any bytes inside a published JSON string, alone or in a batch: valid UTF-8 is published
    and reaches a subscriber as sent, in seq order; anything else is a 400 that takes no seq
    and reaches nobody (the next event's seq proves it), and a batch is all or nothing."""
    url = f"http://127.0.0.1:{daemon.http}"
    with Surface(daemon, "publish_encodings") as surface, httpx.Client(base_url=url) as http:
        sock = ws_connect(daemon.ws)
        sock.sendall(client_frame(1, b'{"op":"subscribe","channel":"notice","id":"s"}'))
        last = json.loads(read_text_frame(sock))["streams"]["notice"]["seq"]

        @FUZZ
        @given(chunks=st.lists(st.binary(max_size=16), min_size=1, max_size=3), batch=st.booleans())
        @example(chunks=[b"ok", b"\xff\xfe"], batch=True)
        @example(chunks=[b"\xed\xa0\x80"], batch=False)  # a UTF-16 surrogate, UTF-8 encoded
        def one(chunks: list[bytes], batch: bool) -> None:
            nonlocal last
            surface.case()
            # what JSON itself forbids in a string is left out: the bytes' encoding is the point
            chunks = [bytes(b for b in c if b >= 0x20 and b not in b'"\\') for c in chunks]
            items = [b'{"channel":"notice","data":"' + c + b'"}' for c in chunks]
            if batch:
                body = b'{"messages":[' + b",".join(items) + b"]}"
            else:
                chunks, body = chunks[:1], items[0]
            r = http.post("/v1/publish/batch" if batch else "/v1/publish", content=body,
                          headers=AUTH)  # fmt: skip
            texts = [utf8(c) for c in chunks]
            if any(text is None for text in texts):
                assert r.status_code == 400, (chunks, r.text)
                return
            assert r.status_code == 200, (chunks, r.text)
            for text in texts:
                event = json.loads(read_text_frame(sock))
                assert (event["seq"], event["data"]) == (last + 1, text), (chunks, event)
                last += 1

        one()
        sock.close()


async def test_a_flood_of_undecodable_bus_messages_is_logged_throttled(
    nursery: trio.Nursery,
) -> None:
    """Anyone with access to Redis can publish on a channel's pub/sub: what is not a bus
    message is dropped with a throttled warning (not one line each, a log flood), and the
    stream goes on."""
    with RedisServer() as redis:
        bus = {"kind": "redis", "redis": {"url": redis.url, "timeout_s": 1.0}}
        running = await start_daemon(nursery, make_config(bus=bus))
        async with open_client(running.ws_url) as client:
            assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
            with capture_logs() as logs:
                async with coredis.Redis.from_url(redis.url, decode_responses=False) as r:
                    for _ in range(50):
                        await r.publish(Keys("pushd", "notice").pubsub, b"not a bus message")
                await running.publish("notice", {"n": 1})  # after them: Redis keeps the order
                assert (await client.recv())["data"] == {"n": 1}
    dropped = [line for line in logs if line["event"] == "undecodable bus message"]
    assert 1 <= len(dropped) <= 5, len(dropped)
