"""Links to Redis checked by pushd (issue 19, items 3 and 5): a half-open link (a proxy that
stops forwarding both ways and closes nothing, tests/blackhole.py) is noticed by pushd's own
probe, makes the node not ready and is replaced; what was published meanwhile is replayed;
after the heal Redis holds exactly what the node wants, on the connections it names. Real
redis-server (and a 3-node Cluster whose nodes announce their proxies), real nodes."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import anyio
import coredis
import coredis.exceptions
import httpx
import msgspec
import pytest
import trio
from blackhole import Blackhole, proxied, redis_cli
from conftest import Running, open_client, start_daemon, subscribed
from coredis.connection import TCPLocation
from coredis.patterns.pubsub import PubSub
from coredis.pool import ClusterConnectionPool
from redis_servers import Redis, RedisCluster, RedisServer
from structlog.testing import capture_logs
from test_cluster import publish, redis_config
from test_follow import assert_carried, live, settled_in_redis

from pushd.backoff import Backoff
from pushd.bus.link import (
    REDIS_ERRORS,
    Check,
    Cluster,
    Link,
    ShardedPubSub,
    pending_messages,
    probe,
    watch,
)
from pushd.bus.model import Outgoing
from pushd.bus.redis import RedisBus
from pushd.errors import BusUnavailable, LinkDead

PROBE_S = 1.0  # bus.redis.probe_interval_s
TIMEOUT_S = 1.0  # bus.redis.timeout_s (redis_config's)
# pushd's own bound is PROBE_S + TIMEOUT_S (docs/cluster.md); coredis alone takes ~17 s. The
# slack is for a loaded machine, not a claim (the times are printed: the report's numbers).
NOTICE_S = PROBE_S + TIMEOUT_S + 3
CHECKED = ("subscribe", "commands", "control")  # the links a gateway holds without publishing


class Behind(NamedTuple):
    """A compute node on Redis and a gateway reaching it through black-holing proxies."""

    proxies: list[Blackhole]
    via: dict[int, int]  # proxy port: the server's
    compute: Running
    gateway: Running
    bus: RedisBus  # the gateway's


async def behind_proxies(nursery: trio.Nursery, redis: Redis, **gateway: Any) -> Behind:
    """(``gateway``: more sections of the gateway's configuration)"""
    proxies = await proxied(nursery, redis)
    via = {proxy.port: proxy.target_port for proxy in proxies}
    compute = await start_daemon(nursery, redis_config(redis, "compute"))
    settings = {"url": proxies[0].url, "probe_interval_s": PROBE_S}
    config = redis_config(redis, "gateway", bus={"redis": settings}, **gateway)
    gateway_ = await start_daemon(nursery, config)
    assert gateway_.daemon.redis is not None
    with trio.fail_after(10):
        await gateway_.daemon.redis.wait_ready()
    return Behind(proxies, via, compute, gateway_, gateway_.daemon.redis)


async def until_not_ready(bus: RedisBus) -> None:
    """Until every link the gateway holds has been found dead, each at least once: each is
    probed on its own and replaced as soon as it is found dead (new connections work), so
    under load one can be up again before another is found (CI: commands replaced at 01:21:59,
    control and subscribe found dead at 01:22:00, never all down together). A link marked
    down wakes this task before its replacement's connect can finish (that awaits I/O)."""
    seen: set[str] = set()
    with trio.fail_after(NOTICE_S):
        while True:
            seen.update(link for link in CHECKED if not bus.links()[link])
            if seen == set(CHECKED):
                return
            await bus.wait_changed()


async def test_a_half_open_link_is_noticed_told_and_replaced(
    nursery: trio.Nursery, redis: Redis
) -> None:
    proxies, via, compute, gateway, bus = await behind_proxies(nursery, redis)
    with capture_logs() as logs:
        async with (
            open_client(gateway.ws_url) as client,
            httpx.AsyncClient(base_url=gateway.http_url) as http,
        ):
            channels = ["notice", "BTCUSDT@trades"]
            reply = await client.call({"op": "subscribe", "channel": channels})
            assert subscribed(reply, *channels)
            await live(client, compute, 0)
            assert (await http.get("/readyz")).status_code == 200

            cut_at = trio.current_time()
            for proxy in proxies:  # the gateway's connections only: the compute's go on
                proxy.cut(bus.name.encode())
            await until_not_ready(bus)
            noticed = trio.current_time() - cut_at
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            reason = ready.json()["reason"]
            assert reason.startswith("Redis unreachable") and "link" in reason, reason
            metrics = (await http.get("/metrics")).text
            for link in CHECKED:
                assert f'pushd_bus_up{{link="{link}"}} 0.0' in metrics
            for n in (1, 2, 3):  # published while the gateway is cut off
                await publish(compute, "notice", {"n": n})
            refused = await client.call({"op": "subscribe", "channel": "SOLUSDT@trades", "id": 7})
            assert refused.get("code") == 13, refused  # told, not left waiting

            healed_at = trio.current_time()
            for proxy in proxies:
                proxy.heal()
            with trio.fail_after(20):
                await bus.wait_ready()
            recovered = trio.current_time() - healed_at
            got = []
            with trio.fail_after(5):  # replayed by the catch-up of the new session
                while len(got) < 3:
                    message = await client.recv()
                    if message.get("event") == "notice":
                        got.append(message["data"]["n"])
            assert got == [1, 2, 3]
            assert (await http.get("/readyz")).status_code == 200
            request = {"op": "subscribe", "channel": "SOLUSDT@trades"}
            with trio.fail_after(10):
                while (reply := await client.call(request)).get("code") == 13:
                    pass
            assert subscribed(reply, "SOLUSDT@trades"), reply
            await live(client, compute, 4)
            # issue 19, item 5: after the heal the old connections' held bytes reach Redis and
            # their connections end; Redis holds what the hubs want, on the named connections
            await settled_in_redis(redis, channels=3, control=2)
            await assert_carried(gateway, redis, via)
    print(f"\nhalf-open link ({describe(redis)}): noticed after {noticed:.2f} s, "
          f"ready again {recovered:.2f} s after the heal")  # fmt: skip
    events = [line["event"] for line in logs]
    assert "undecodable control message" not in events
    assert "Redis link dead: replacing it" in events
    assert "Redis pub/sub lost: resubscribing" in events


def describe(redis: Redis) -> str:
    return "3-node Cluster" if isinstance(redis, RedisCluster) else "one Redis"


def test_backoff_doubles_up_to_the_most_and_starts_again_after_a_success() -> None:
    backoff = Backoff(0.5, 3.0)  # the bus, the poller and the supervisor share this rule
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.delay == 0.5 and backoff.next() == 0.5 and backoff.delay == 1.0


def test_only_a_failing_link_is_redis_unreachable() -> None:
    """A bug is not an outage: it must not be retried forever as "Redis unreachable"."""
    for outage in (
        coredis.exceptions.ConnectionError("lost"), coredis.exceptions.ClusterDownError("down"),
        coredis.exceptions.ResponseError("NOAUTH"), ConnectionRefusedError(), TimeoutError(),
        trio.TooSlowError(), trio.BrokenResourceError(), anyio.ClosedResourceError(),
        anyio.EndOfStream(), LinkDead("no PONG"), BusUnavailable("no pub/sub"),
    ):  # fmt: skip
        assert isinstance(outage, REDIS_ERRORS), outage
    for bug in (TypeError(), KeyError("x"), AssertionError(), AttributeError(), ValueError()):
        assert not isinstance(bug, REDIS_ERRORS), bug


@pytest.fixture
def one_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_a_control_command_that_fails_is_logged(
    nursery: trio.Nursery, one_redis: RedisServer
) -> None:
    """A kick whose answer Redis refuses (the reply key holds a string: WRONGTYPE) is said in
    the log, with the command and why, instead of vanishing; the node goes on obeying. (One
    Redis: the control plane's code is the same on a Cluster.)"""
    redis = one_redis
    node = await start_daemon(nursery, redis_config(redis, "gateway"))
    bus = node.daemon.redis
    assert bus is not None
    with trio.fail_after(10):
        await bus.wait_ready()
    reply = f"{bus.prefix}:reply:not-a-list"
    redis_cli(redis.port, "SET", reply, "a string")
    kick = msgspec.json.encode({"op": "kick", "uid": "u1", "reply": reply}).decode()
    with capture_logs() as logs:
        redis_cli(redis.port, "PUBLISH", f"{bus.prefix}:control", kick)
        with trio.fail_after(5):  # (a log has no event to await: polled)
            while not [line for line in logs if line["event"] == "control answer not sent"]:  # noqa: ASYNC110
                await trio.sleep(0.02)
    said = next(line for line in logs if line["event"] == "control answer not sent")
    assert said["op"] == "kick" and said["error"].startswith("WrongTypeError"), said
    assert node.daemon.control is not None
    assert [n.node for n in await node.daemon.control.stats()] == [node.daemon.control.node_id]


async def test_a_probe_finds_the_one_silent_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The probe PINGs every connection of a link at once (one per shard): all answering in
    time is alive; one silent is dead after ``timeout_s``, each round ``interval_s`` apart."""
    answered: list[float] = []

    async def pong() -> None:
        answered.append(trio.current_time())

    async def silent() -> None:
        await trio.sleep_forever()

    def quiet() -> float:  # nothing heard but the PONGs
        return math.inf

    pong_, silent_ = Check(pong, quiet), Check(silent, quiet)
    await probe([pong_, pong_], timeout_s=2.0)  # (the sans-IO part's shell: no Redis needed)
    start = trio.current_time()
    with pytest.raises(LinkDead, match="within 2 s"):
        await probe([pong_, silent_], timeout_s=2.0)
    assert trio.current_time() - start == 2.0
    answered.clear()
    start = trio.current_time()
    rounds = iter([[pong_], [pong_], [pong_, silent_]])
    with pytest.raises(LinkDead):
        await watch(lambda: next(rounds), interval_s=1.0, timeout_s=2.0)
    assert [t - start for t in answered] == [0.0, 1.0, 2.0]
    assert trio.current_time() - start == 4.0  # noticed within interval_s + timeout_s


async def test_a_connection_still_receiving_is_alive_however_late_its_pong(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only silence is death: a pub/sub connection whose backlog (a burst, a CPU-saturated
    node) delays its PONG past ``timeout_s`` but that keeps receiving bytes is alive; a
    resubscribe then would only add a catch-up storm to the load. One that falls silent is
    dead ``timeout_s`` after its last byte."""
    heard_at = 0.0  # when the backlogged connection last received a byte

    async def late_pong() -> None:  # the backlog drains for 5 s before the PONG
        nonlocal heard_at
        for _ in range(50):
            await trio.sleep(0.1)
            heard_at = trio.current_time()

    def quiet() -> float:
        return trio.current_time() - heard_at

    start = trio.current_time()
    await probe([Check(late_pong, quiet)], timeout_s=1.0)
    assert trio.current_time() - start == pytest.approx(5.0)

    async def falls_silent() -> None:  # 1.5 s of bytes, then nothing
        nonlocal heard_at
        for _ in range(15):
            await trio.sleep(0.1)
            heard_at = trio.current_time()
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(LinkDead):
        await probe([Check(falls_silent, quiet)], timeout_s=1.0)
    assert trio.current_time() - start == pytest.approx(2.5)  # its last byte + timeout_s


def test_a_link_says_why_it_is_down() -> None:
    link = Link("control")
    assert not link.up and link.reason == "not connected yet"
    assert link.mark(True) and link.up and link.reason == ""
    assert not link.mark(True)  # no change
    assert link.mark(False, "no answer to PING within 2 s") and not link.up
    assert link.reason == "no answer to PING within 2 s"


async def test_what_coredis_received_is_read_without_waiting() -> None:
    """Pinned: the bus reads coredis's private ``_receive_stream`` (coredis 6.9 has no public
    way to take what a pub/sub session received without a scheduler turn per message); a
    coredis that changes it fails here, not silently slower in production."""
    pool = coredis.ConnectionPool.from_url("redis://127.0.0.1:1")  # never connected
    ps = PubSub(pool)  # not entered: no connection, no I/O
    received = [{"type": "message", "channel": b"c", "data": str(n).encode()} for n in range(3)]
    for message in received:
        ps._send_stream.send_nowait(message)  # as coredis's push reader does
    pending = pending_messages(ps)
    assert list(pending()) == received
    assert list(pending()) == []


async def test_a_dead_link_is_replaced_while_new_connections_work(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """The network forgot the gateway's connections (a NAT, a firewall) but new ones work: the
    dead links are noticed and replaced without any heal, and what was published meanwhile
    is replayed."""
    proxies, via, compute, gateway, bus = await behind_proxies(nursery, redis)
    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        await live(client, compute, 0)
        cut_at = trio.current_time()
        cut = sum(proxy.cut_open(bus.name.encode()) for proxy in proxies)
        assert cut >= len(CHECKED)  # commands, data (a shard each), control
        for n in (1, 2, 3):  # published after the cut: the gateway's old link drops them
            await publish(compute, "notice", {"n": n})
        await until_not_ready(bus)
        noticed = trio.current_time() - cut_at
        with trio.fail_after(NOTICE_S):
            await bus.wait_ready()
        replaced = trio.current_time() - cut_at
        got = []
        with trio.fail_after(5):
            while len(got) < 3:
                message = await client.recv()
                if message.get("event") == "notice":
                    got.append(message["data"]["n"])
        assert got == [1, 2, 3]
        await live(client, compute, 4)
        # Redis itself still holds the old connections (it cannot tell either, until its
        # tcp-keepalive): once they end, it holds exactly what the hubs want
        for proxy in proxies:
            proxy.heal()
        await settled_in_redis(redis, channels=1, control=2)
        await assert_carried(gateway, redis, via)
    print(f"\ndead link, new ones working ({describe(redis)}): noticed after {noticed:.2f} s, "
          f"replaced (ready) after {replaced:.2f} s")  # fmt: skip


async def test_a_publishers_dead_link_is_replaced(nursery: trio.Nursery, redis: Redis) -> None:
    """The compute node's connections die (new ones work): its command link is found dead
    (not ready), what it publishes meanwhile waits in its outbox and reaches the gateway's
    client in order, without any heal. (The publisher has a deadline of its own, and coredis
    drops a pipeline's connection when its wait is cancelled; a gateway's plain commands,
    e.g. the catch-up's reads, need the probe: the test above fails without it.)"""
    proxies = await proxied(nursery, redis)
    settings = {"url": proxies[0].url, "probe_interval_s": PROBE_S}
    compute = await start_daemon(nursery, redis_config(redis, "compute", bus={"redis": settings}))
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    bus = compute.daemon.redis
    assert bus is not None
    with trio.fail_after(10):
        await bus.wait_ready()
    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        await live(client, compute, 0)
        cut_at = trio.current_time()
        assert sum(proxy.cut_open(bus.name.encode()) for proxy in proxies) >= len(CHECKED)
        bus.publish([Outgoing("notice", msgspec.Raw(b'{"n":%d}' % n)) for n in (1, 2, 3)])
        with trio.fail_after(NOTICE_S):
            while bus.links()["commands"]:
                await bus.wait_changed()
        got = []
        with trio.fail_after(NOTICE_S):
            while len(got) < 3:
                message = await client.recv()
                if message.get("event") == "notice":
                    got.append(message["data"]["n"])
        delivered = trio.current_time() - cut_at
        assert got == [1, 2, 3]
        with trio.fail_after(NOTICE_S):
            await bus.wait_ready()
    for proxy in proxies:
        proxy.heal()
    print(f"\npublisher's dead link ({describe(redis)}): its outbox delivered "
          f"{delivered:.2f} s after the cut")  # fmt: skip


async def test_a_shard_that_fails_to_connect_leaks_no_connection(nursery: trio.Nursery) -> None:
    """A pub/sub session on a Cluster connects to every primary; when one of them is reset
    while the others connected (a link that flaps), those connected go back to the pool.
    (coredis 6.9 leaked them: each an open connection and a slot of the pool's per-node queue
    taken for good, until after some twenty flaps every new session waited forever for a
    connection and the node stayed not ready.)"""
    with RedisCluster() as cluster:  # (a Cluster only: one shard fails, the others connect)
        proxies = await proxied(nursery, cluster)
        first = proxies[0]
        async with Cluster(
            startup_nodes=[TCPLocation("127.0.0.1", first.port)], decode_responses=False,
            connect_timeout=TIMEOUT_S, stream_timeout=TIMEOUT_S,
            connection_pool_cls=functools.partial(ClusterConnectionPool, client_name="flaps:data"),
        ) as client:  # fmt: skip
            pool = client.connection_pool
            ports = [node.port for node in pool.cluster_layout.primaries]
            connected, failing = ports[0], ports[1:]  # connected first, then one that fails
            for proxy in proxies:
                if proxy.port in failing:
                    proxy.reset(after=0)
            failed = 0
            for _ in range(30):  # more than a node's share of the pool (64 // 3)
                with trio.fail_after(5):  # an outage, said at once: not a wait forever
                    try:
                        async with ShardedPubSub(pool, retry_policy=None):
                            pass
                    except* REDIS_ERRORS:
                        failed += 1
            assert failed == 30
            for proxy in proxies:
                proxy.heal()
            with trio.fail_after(5):
                async with ShardedPubSub(pool, retry_policy=None) as ps:
                    await ps.subscribe("{a}")
            via = {proxy.port: proxy.target_port for proxy in proxies}
            open_ = redis_cli(via[connected], "CLIENT", "LIST").count("name=flaps:data")
            assert open_ <= 1, open_  # the one the pool keeps


async def test_a_link_replaced_again_and_again_comes_back_every_time(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """Every pub/sub session a node ends (a dead link, Redis restarted, a refused subscribe)
    is replaced; a gateway whose link flaps more often than its pool has connections (64;
    on a Cluster 64 // 3 a node) still gets a new one each time. (coredis 6.9's pools forget
    the slot of a connection handed back closed, and the bus closes every pub/sub connection
    it ends: the 65th session waited forever and the node stayed not ready.)"""
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    bus = gateway.daemon.redis
    assert bus is not None
    with trio.fail_after(10):
        await bus.wait_ready()
    servers = redis.nodes if isinstance(redis, RedisCluster) else [redis]
    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        for _ in range(70):
            killed = 0
            for server in servers:  # Redis ends the node's data connections (CLIENT KILL)
                for line in redis_cli(server.port, "CLIENT", "LIST").splitlines():
                    if f"name={bus.data_name} " in line:
                        client_id = line.split()[0].removeprefix("id=")
                        redis_cli(server.port, "CLIENT", "KILL", "ID", client_id)
                        killed += 1
            assert killed
            with trio.fail_after(10):
                while bus.links()["subscribe"]:
                    await bus.wait_changed()
                await bus.wait_ready()
        await live(client, gateway, 1)
    for server in servers:  # bounded: the session's one connection a node, nothing left over
        held = redis_cli(server.port, "CLIENT", "LIST").count(f"name={bus.data_name} ")
        assert held <= 1, held


async def test_a_link_behind_a_backlog_is_alive(nursery: trio.Nursery, redis: Redis) -> None:
    """A burst the gateway's pub/sub connection takes ~4 s to read (a network slower than the
    burst): its PONGs wait behind the backlog, seconds past ``timeout_s``, while bytes keep
    coming. The link stays up (no resubscribe, no catch-up) and the client gets every event
    in order."""
    limits = {"outbound_buffer_bytes": 8 << 20}  # the client takes the burst whole
    proxies, _, compute, gateway, bus = await behind_proxies(nursery, redis, limits=limits)
    publisher = compute.daemon.redis
    assert publisher is not None
    went_down: list[str | None] = []

    async def watch_subscribe() -> None:
        while True:
            await bus.wait_changed()
            if not bus.links()["subscribe"]:
                went_down.append(bus.not_ready())

    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        await live(client, compute, 0)
        nursery.start_soon(watch_subscribe)
        for proxy in proxies:
            proxy.throttle(bus.data_name.encode(), 500_000)  # bytes a second
        pad = "x" * 2000
        count = 1000  # ~2 MB: ~4 s to read at that rate, PINGs sent meanwhile wait behind
        data = [msgspec.json.encode({"n": n, "pad": pad}) for n in range(1, count + 1)]
        publisher.publish([Outgoing("notice", msgspec.Raw(item)) for item in data])
        start = trio.current_time()
        got = []
        with trio.fail_after(30):
            while len(got) < count:
                message = await client.recv()
                if message.get("event") == "notice":
                    got.append(message["data"]["n"])
        drained = trio.current_time() - start
        assert got == list(range(1, count + 1))
        assert drained > TIMEOUT_S + PROBE_S, drained  # the PONGs were that late
        assert went_down == [], went_down
    print(f"\nbacklog ({describe(redis)}): read in {drained:.2f} s, link up throughout")


async def test_links_reset_at_every_step_come_back(nursery: trio.Nursery, redis: Redis) -> None:
    """The gateway's connections reset (TCP RST) after so many bytes: in the handshake, the
    subscribe, a PING, a read. Nothing escapes as a crash (an error group from a nursery
    included), and after each the node is ready again and its client gets live events."""
    proxies, _, compute, gateway, bus = await behind_proxies(nursery, redis)
    async with open_client(gateway.ws_url) as client:
        assert subscribed(await client.call({"op": "subscribe", "channel": "notice"}), "notice")
        await live(client, compute, 0)
        for n, after in enumerate((0, 1, 5, 40, 100, 200, 500), start=1):
            done = [proxy.reset_done for proxy in proxies]
            for proxy in proxies:
                proxy.reset(bus.name.encode(), after)
            with trio.fail_after(NOTICE_S):  # a PING's bytes at the latest
                await first_of(done)
            for proxy in proxies:
                proxy.heal()
            with trio.fail_after(NOTICE_S):
                await bus.wait_ready()
            await live(client, compute, n)
    assert sum(proxy.resets for proxy in proxies) >= 7


async def first_of(events: list[trio.Event]) -> None:
    """Until one of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
