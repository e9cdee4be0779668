"""A backend's publishes over the authenticated engine link (docs/wire.md, "Publishing from a
backend"), against a real daemon over real sockets.

Source 1 carries market data, 2 private events, 3 is a backend (``backend = true``): only 3
may publish, and only what the HTTP API would take (``notice``, ``user_<uid>_<stream>``, data
of one JSON value within the size limit). A frame asking for an ack gets one, in order.
"""

from __future__ import annotations

import httpx
import msgspec
import trio
import trio.testing
from conftest import Client, Running, make_config, open_client, start_daemon, subscribed
from scrape import Scrape
from test_ingest_auth import KEYS, metrics

from ingest import wire
from ingest.framing import Framer
from ingest.transport import UdpSender

BACKEND_KEY = b"backend-key-of-the-engine-publish-tests!"


async def backend_daemon(nursery: trio.Nursery) -> Running:
    sources = [
        {"id": 1, "key": KEYS[1].decode(), "silent_after_s": 0},
        {"id": 2, "key": KEYS[2].decode(), "private": True, "silent_after_s": 0},
        {"id": 3, "key": BACKEND_KEY.decode(), "backend": True, "silent_after_s": 0},
    ]
    return await start_daemon(
        nursery,
        make_config(
            ingest={"allow_unauthenticated": False, "sources": sources},
            http={"allow_market_publish": False},
        ),
    )


class Link:
    """A sender's TCP connection to the ingest port that reads its acks."""

    def __init__(self, stream: trio.SocketStream, src: int, key: bytes) -> None:
        self.stream = stream
        self.framer = Framer(src, key=key)
        self.acks = wire.StreamDecoder()

    @classmethod
    async def open(cls, running: Running, src: int, key: bytes) -> Link:
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
        link = cls(stream, src, key)
        assert (await link.send([wire.Heartbeat()])).verdict == "restart"
        return link

    async def send(self, events: list[wire.Event]) -> wire.Ack:
        await self.stream.send_all(self.framer.tcp_frame(events, ack=True))
        return await self.ack()

    async def ack(self) -> wire.Ack:
        with trio.fail_after(5):
            while (body := self.acks.next_body()) is None:
                data = await self.stream.receive_some(65536)
                assert data, "pushd closed the link"
                self.acks.feed(data)
        return wire.decode_ack(body)


def publish(channel: str, data: bytes) -> wire.Publish:
    return wire.Publish(channel, data)


def events(scrape: Scrape, kind: str) -> float:
    return scrape.total("pushd_ingest_events_total", type=kind)


async def notice_watcher(client: Client) -> None:
    assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")


async def test_a_backend_publishes_notices_and_user_messages_acked(nursery: trio.Nursery) -> None:
    """A backend source's publishes reach the notice and private subscribers as sent, each
    frame's ack naming its seq; over UDP a publish goes the same way, unacked."""
    running = await backend_daemon(nursery)
    async with open_client(running.ws_url) as watcher, open_client(running.ws_url) as alice:
        await notice_watcher(watcher)
        await alice.call({"op": "auth", "token": running.token("1001")})
        assert subscribed(await alice.call({"op": "subscribe", "channel": "@account"}), "@account")
        link = await Link.open(running, 3, BACKEND_KEY)
        ack = await link.send([publish("notice", b'{"text":"maintenance at 02:00"}')])
        assert ack == wire.Ack(3, link.framer.epoch, 2, "in_order", [])
        assert (await watcher.recv())["data"] == {"text": "maintenance at 02:00"}
        ack = await link.send([publish("user_1001_account", b'{"equity":"10.5"}')])
        assert (ack.seq, ack.refused) == (3, [])
        assert (await alice.recv())["data"] == {"equity": "10.5"}
        udp = UdpSender("127.0.0.1", running.ports.ingest_udp, src=3, key=BACKEND_KEY)
        await udp.send([publish("notice", b'{"by":"udp"}')])
        assert (await watcher.recv())["data"] == {"by": "udp"}
    assert events(await metrics(running), "Publish") == 3


async def test_publishes_the_http_api_refuses_are_refused_and_counted(
    nursery: trio.Nursery,
) -> None:
    """From the backend source, one frame holding a market channel, a channel that does not
    exist, data over the HTTP API's limit, data that is not JSON and one good notice: the four
    are refused (in the ack, by index and reason, and in the counters), the notice goes, and
    the connection goes on."""
    running = await backend_daemon(nursery)
    limit = running.daemon.config.limits.publish_max_bytes
    async with open_client(running.ws_url) as watcher:
        await notice_watcher(watcher)
        link = await Link.open(running, 3, BACKEND_KEY)
        ack = await link.send([
            publish("trades_BTCUSDT", b'{"trades":[]}'),
            publish("nope", b"{}"),
            publish("notice", b'"' + b"x" * limit + b'"'),
            publish("notice", b"{not json"),
            publish("notice", b'{"ok":1}'),
        ])  # fmt: skip
        assert ack.verdict == "in_order"
        assert ack.refused == [
            (0, "publish_forbidden"), (1, "publish_invalid"), (2, "publish_too_large"),
            (3, "publish_invalid"),
        ]  # fmt: skip
        assert (await watcher.recv())["data"] == {"ok": 1}
        assert (await link.send([publish("notice", b'{"ok":2}')])).refused == []
        assert (await watcher.recv())["data"] == {"ok": 2}
    scrape = await metrics(running)
    assert events(scrape, "publish_forbidden") == 1
    assert events(scrape, "publish_invalid") == 2
    assert events(scrape, "publish_too_large") == 1
    assert events(scrape, "Publish") == 2


async def test_engine_sources_may_not_publish(nursery: trio.Nursery) -> None:
    """The market-data source and the private-events source are engine sources: their
    publishes (a notice, another user's channel) are refused as not permitted and counted, and
    their connections go on; the backend's notice after them is the first the watcher sees."""
    running = await backend_daemon(nursery)
    async with open_client(running.ws_url) as watcher, open_client(running.ws_url) as alice:
        await notice_watcher(watcher)
        await alice.call({"op": "auth", "token": running.token("1001")})
        assert subscribed(await alice.call({"op": "subscribe", "channel": "@order"}), "@order")
        for src in (1, 2):
            link = await Link.open(running, src, KEYS[src])
            ack = await link.send([publish("notice", b'{"forged":1}'),
                                   publish("user_1001_order", b'{"forged":1}')])  # fmt: skip
            assert ack.refused == [(0, "not_permitted"), (1, "not_permitted")]
            assert (await link.send([wire.Heartbeat()])).verdict == "in_order"  # still open
        backend = await Link.open(running, 3, BACKEND_KEY)
        await backend.send([publish("notice", b'{"real":1}'), publish("user_1001_order", b"2")])
        assert (await watcher.recv())["data"] == {"real": 1}
        assert (await alice.recv())["data"] == 2
    assert events(await metrics(running), "not_permitted") == 4


async def test_forged_and_garbage_publish_frames_get_no_ack_and_do_nothing(
    nursery: trio.Nursery,
) -> None:
    """A publish frame sealed with a key pushd does not know is refused and its connection
    closed, unanswered (as any refused first frame); once admitted, a frame whose body is not
    an envelope, or whose publish has no data, is a bad frame: counted, unanswered, and the
    connection goes on."""
    running = await backend_daemon(nursery)
    async with open_client(running.ws_url) as watcher:
        await notice_watcher(watcher)
        stranger = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
        forged = Framer(3, key=b"not-the-backend-key-of-these-tests-at-all")
        await stranger.send_all(forged.tcp_frame([publish("notice", b'{"forged":1}')], ack=True))
        with trio.fail_after(5):
            assert await stranger.receive_some(100) == b""  # closed, no ack
        link = await Link.open(running, 3, BACKEND_KEY)
        seal = link.framer
        await link.stream.send_all(
            wire.length_prefixed(wire.seal(b"\xc1garbage", 3, BACKEND_KEY, seal.epoch // 10**6))
        )
        no_data = wire.encode(
            wire.Envelope(3, seal.epoch, 2, [wire.Heartbeat()], ack=True)
        ).replace(b"\xa9heartbeat", b"\xa7publish")
        await link.stream.send_all(
            wire.length_prefixed(wire.seal(no_data, 3, BACKEND_KEY, seal.epoch // 10**6))
        )
        ack = await link.send([publish("notice", b'{"real":1}')])
        assert (ack.seq, ack.verdict, ack.refused) == (2, "in_order", [])  # the first ack since
        assert (await watcher.recv())["data"] == {"real": 1}
    scrape = await metrics(running)
    assert scrape.value("pushd_ingest_bad_frames_total", transport="tcp") == 2
    assert scrape.value("pushd_ingest_refused_frames_total", transport="tcp", reason="bad_mac") == 1


async def test_a_source_without_a_key_never_publishes(running: Running) -> None:
    """With ``allow_unauthenticated`` (the tests' default config), unsealed frames of a source
    without a key are taken: its trades would count, its publishes never do (not permitted,
    counted); the watcher's first notice is the one published over HTTP after them."""
    async with open_client(running.ws_url) as watcher:
        await notice_watcher(watcher)
        sender = UdpSender("127.0.0.1", running.ports.ingest_udp, src=7, key=None)
        await sender.send([publish("notice", b'{"forged":1}')])
        await trio.testing.wait_all_tasks_blocked()  # the datagram was read and dealt with
        await running.publish("notice", {"real": 1})
        assert (await watcher.recv())["data"] == {"real": 1}
    scrape = await metrics(running)
    assert events(scrape, "not_permitted") == 1
    assert events(scrape, "Publish") == 0


async def test_a_reloaded_outbound_buffer_limits_engine_publishes_as_http_ones(
    nursery: trio.Nursery,
) -> None:
    """``limits.outbound_buffer_bytes`` reloads live, and with it the HTTP API's publish limit
    (a quarter of it): the engine link's limit follows the same reload, so a message the HTTP
    API now refuses as too large is refused over the link too."""
    running = await backend_daemon(nursery)
    config = running.daemon.config
    smaller = config.limits.outbound_buffer_bytes // 2
    running.daemon.load_config = lambda: msgspec.structs.replace(
        config, limits=msgspec.structs.replace(config.limits, outbound_buffer_bytes=smaller)
    )
    change = await running.daemon.reload()
    assert change is not None and "limits.outbound_buffer_bytes" in change.applied
    link = await Link.open(running, 3, BACKEND_KEY)
    data = b'"' + b"x" * (smaller // 4) + b'"'  # within the old limit, over the new one
    assert (await link.send([publish("notice", data)])).refused == [(0, "publish_too_large")]


async def test_publishes_the_bus_drops_are_refused_in_the_ack(nursery: trio.Nursery) -> None:
    """Redis down and the node's outbox full (``bus.redis.outage_buffer``): the bus drops
    what it cannot hold, and the ack says so by index (``publish_dropped``), so a backend
    that waits for acks knows to send them again; what the outbox took is acked as taken."""
    from redis_servers import RedisServer
    from test_cluster import AUTH, redis_config

    with RedisServer() as redis:
        sources = [{"id": 3, "key": BACKEND_KEY.decode(), "backend": True, "silent_after_s": 0}]
        config = redis_config(
            redis, bus={"redis": {"outage_buffer": 2}},
            ingest={"allow_unauthenticated": False, "sources": sources},
        )  # fmt: skip
        running = await start_daemon(nursery, config)
        bus = running.daemon.redis
        assert bus is not None
        link = await Link.open(running, 3, BACKEND_KEY)
        redis.kill()
        notice = {"channel": "notice", "data": 1}
        async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as http:
            with trio.fail_after(10):  # each a real publish: the first to fail says 503
                while (
                    await http.post("/v1/publish", headers=AUTH, json=notice)
                ).status_code == 200:
                    pass
        room = 2 - bus.outbox_size
        ack = await link.send([publish("notice", b"%d" % i) for i in range(4)])
        assert ack.verdict == "in_order"
        assert ack.refused == [(i, "publish_dropped") for i in range(room, 4)]
        assert events(await metrics(running), "publish_dropped") == 4 - room
