"""Engine -> pushd over real UDP and TCP sockets: routing, bad input, loss detection, poller."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio
from conftest import (
    Client,
    Running,
    make_config,
    open_client,
    order,
    start_daemon,
    subscribed,
    trade,
)

from ingest import wire
from ingest.framing import Framer
from ingest.transport import TcpSender, UdpSender
from pushd.config import EngineConfig, LimitsConfig, MarketConfig
from pushd.feed.intake import Policy
from pushd.feed.poller import SnapshotPoller


async def subscribe_private(c: Client, running: Running, uid: str) -> None:
    await c.call({"op": "auth", "token": running.token(uid)})
    reply = await c.call({"op": "subscribe", "channel": ["@order", "@balance", "@position"]})
    assert subscribed(reply, "@order", "@balance", "@position")


async def test_private_events_reach_their_owner(running: Running) -> None:
    sender = TcpSender("127.0.0.1", running.ports.ingest_tcp, src=9)
    async with open_client(running.ws_url) as alice, open_client(running.ws_url) as bob:
        await subscribe_private(alice, running, "1001")
        await subscribe_private(bob, running, "1002")
        balance = wire.BalanceUpdate("1001", "USDT", "99999.5", "650.001", "order", 5)
        position = wire.PositionUpdate("1001", "BTCUSDT", "-0.010", "65000.1", "0", 6)
        await sender.send([order("1002", 1), order("1001", 2), balance, position])
        got = [await alice.recv() for _ in range(3)]
        assert [m["event"] for m in got] == ["@order", "@balance", "@position"]
        assert got[0]["data"]["order_id"] == 2 and got[0]["data"]["price"] == "65000.1"
        assert got[1]["data"] == {"type": "balance", "uid": "1001", "asset": "USDT",
                                  "free": "99999.5", "locked": "650.001", "reason": "order",
                                  "ts": 5}  # fmt: skip
        assert got[2]["data"]["qty"] == "-0.010"
        assert (await bob.recv())["data"]["order_id"] == 1
    await sender.aclose()


async def test_garbage_on_both_listeners_costs_the_good_sender_nothing(running: Running) -> None:
    daemon = running.daemon
    udp_good = UdpSender("127.0.0.1", running.ports.ingest_udp, src=1)
    tcp_good = TcpSender("127.0.0.1", running.ports.ingest_tcp, src=2)
    junk_udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    async with open_client(running.ws_url) as c:
        await subscribe_private(c, running, "1001")
        sent = 0
        for round_ in range(20):
            await junk_udp.sendto(b"\x00garbage" * round_, ("127.0.0.1", running.ports.ingest_udp))
            await junk_udp.sendto(b"\x81\xa3src", ("127.0.0.1", running.ports.ingest_udp))
            await udp_good.send([trade(sent + 1), trade(sent + 2)])
            junk_tcp = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
            await junk_tcp.send_all(b"\xff\xff\xff\xff" + b"x" * 100)  # impossible length
            bad_body = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
            await bad_body.send_all(wire.LENGTH_PREFIX.pack(3) + b"\xc1\xc1\xc1")
            await tcp_good.send([trade(sent + 3)])
            sent += 3
            await junk_tcp.aclose()
            await bad_body.aclose()
        await udp_good.send([order("1001", 1)])  # markers: each listener handles in order
        await tcp_good.send([order("1001", 2)])
        markers = {(await c.recv())["data"]["order_id"] for _ in range(2)}
        assert markers == {1, 2}
    assert daemon.markets.trades == sent  # every good trade arrived
    assert daemon.intake.lost_frames == 0
    assert daemon.intake.frames["bad"] >= 40  # ... and every bad frame was counted
    async with open_client(running.ws_url) as c:  # the daemon serves on
        assert (await c.call({"op": "ping"}))["op"] == "pong"
    junk_udp.close()
    udp_good.close()
    await tcp_good.aclose()


async def test_lost_frames_resync_the_sources_symbols(nursery: trio.Nursery) -> None:
    refreshed: list[str] = []
    running = await start_daemon(nursery, make_config())
    running.daemon.markets._refresh_book = refreshed.append
    framer = Framer(src=5, epoch=1)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", running.ports.ingest_udp)
    frames = [framer.datagrams([trade(i)])[0] for i in range(1, 6)]
    async with open_client(running.ws_url) as c, open_client(running.ws_url) as watcher:
        await subscribe_private(c, running, "1001")
        assert await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        for i in (0, 1, 4, 3, 4):  # 1, 2, then 5 (3 and 4 lost), 4 late, 5 again
            await sock.sendto(frames[i], addr)
        await sock.sendto(framer.datagrams([order("1001", 1)])[0], addr)
        await c.recv()
        batches = [(await watcher.recv())["data"]]
        while sum(len(b["trades"]) for b in batches) < 3:
            batches.append((await watcher.recv())["data"])
    # trade clients are told: the batch holding trade 5 says trades may be missing before it
    assert [t["id"] for b in batches for t in b["trades"]] == [1, 2, 5]
    assert [b.get("gap", False) for b in batches if 5 in [t["id"] for t in b["trades"]]] == [True]
    intake = running.daemon.intake
    assert intake.lost_frames == 2
    assert (intake.frames["gap"], intake.frames["late"], intake.frames["duplicate"]) == (1, 1, 1)
    assert refreshed == ["BTCUSDT"]
    assert running.daemon.markets.trades == 3
    sock.close()


class FlakyEngine:
    """A snapshot server the test can slow down, take down, and bring back."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.served = 0
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        decoder = wire.StreamDecoder()
        framer = Framer(src=0)
        async with stream:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    request = frame.events[0]
                    assert isinstance(request, wire.BookRequest)
                    await trio.sleep(self.delay)
                    self.served += 1
                    snap = wire.BookSnapshot(request.symbol, request.request_id, self.served,
                                             [("1", "1")], [("2", "1")], 0)  # fmt: skip
                    await stream.send_all(framer.tcp_frame([snap]))


async def test_poller_survives_slow_down_and_back(nursery: trio.Nursery) -> None:
    engine = FlakyEngine()
    await nursery.start(engine.serve)
    books: list[wire.BookSnapshot] = []
    got_book = trio.Event()

    def on_book(snapshot: wire.BookSnapshot) -> None:
        nonlocal got_book
        books.append(snapshot)
        got_book.set()

    async def next_book() -> wire.BookSnapshot:
        nonlocal got_book
        got_book = trio.Event()
        with trio.fail_after(10):
            await got_book.wait()
        return books[-1]

    config = EngineConfig(snapshot_port=engine.port, request_timeout_s=0.3,
                          reconnect_initial_s=0.05, reconnect_max_s=0.2)  # fmt: skip
    poller = SnapshotPoller(config, {"BTCUSDT": MarketConfig(depth_interval_ms=20)}, on_book)
    nursery.start_soon(poller.run)
    assert (await next_book()).symbol == "BTCUSDT" and poller.up

    engine.delay = 1.0  # slower than the request timeout
    failures = poller.failures
    await wait_for(poller, lambda: poller.failures > failures)
    assert not poller.up
    engine.delay = 0.0
    await next_book()
    assert poller.up

    engine.stop()  # down: connections refused
    failures = poller.failures
    await wait_for(poller, lambda: poller.failures >= failures + 2)
    assert not poller.up
    await nursery.start(engine.serve)  # back on the same port
    await next_book()
    assert poller.up


async def wait_for(poller: SnapshotPoller, condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await poller.wait_changed()


async def test_lost_private_frames_are_told_to_private_subscribers(running: Running) -> None:
    """Frames lost from a source that carries private events may have held anyone's: every
    private subscriber gets a resync notice, never a silent hole (their seqs have none)."""
    framer = Framer(src=6, epoch=1)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", running.ports.ingest_udp)
    frames = [framer.datagrams([order("1001", i)])[0] for i in range(1, 5)]
    async with open_client(running.ws_url) as alice, open_client(running.ws_url) as public:
        await subscribe_private(alice, running, "1001")
        await public.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        await sock.sendto(frames[0], addr)
        first = await alice.recv()
        assert (first["event"], first["seq"]) == ("@order", 1)
        await sock.sendto(frames[3], addr)  # frames 2 and 3 (someone's orders) are lost
        told = [await alice.recv() for _ in range(3)]
        notices = {m["event"]: m for m in told if m.get("resync")}
        assert set(notices) == {"@order", "@balance", "@position"}
        assert notices["@order"]["seq"] == 1  # what it has; what came after may be missing
        after = await alice.recv()
        assert (after["event"], after["seq"], after["data"]["order_id"]) == ("@order", 2, 4)
        assert (await public.call({"op": "ping"}))["op"] == "pong"  # public: nothing to tell
    sock.close()


async def test_engine_unreachable_is_told_not_hidden(nursery: trio.Nursery) -> None:
    """/readyz goes false and depth snapshots (REST and for new subscribers) say "stale"."""
    import httpx

    engine = FlakyEngine()
    await nursery.start(engine.serve)
    config = make_config(
        engine={"snapshot_enabled": True, "snapshot_port": engine.port, "request_timeout_s": 0.3,
                "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
        markets={"BTCUSDT": {"depth_interval_ms": 20}},
    )  # fmt: skip
    running = await start_daemon(nursery, config)
    poller = running.daemon.poller
    await wait_for(poller, lambda: poller.up)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        assert (await http.get("/readyz")).status_code == 200
        depth = (await http.get("/v1/depth", params={"symbol": "BTCUSDT"})).json()
        assert depth["stale"] is False and "stale" not in depth["data"]
        engine.stop()
        await wait_for(poller, lambda: not poller.up)
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "engine" in ready.json()["reason"]
        depth = (await http.get("/v1/depth", params={"symbol": "BTCUSDT"})).json()
        assert depth["stale"] is True and depth["data"]["bids"] == [["1", "1"]]
    async with open_client(running.ws_url) as c:
        await c.call({"op": "subscribe", "channel": "BTCUSDT@depth"})
        snapshot = await c.recv()
        assert snapshot["data"]["e"] == "snapshot" and snapshot["data"]["stale"] is True


class _Recorder:
    """What Intake tells its sink, recorded (Intake is sans-IO: no daemon needed)."""

    def __init__(self) -> None:
        self.trades: list[wire.Trade] = []
        self.resyncs: list[set[str]] = []

    def trade(self, trade: wire.Trade) -> None:
        self.trades.append(trade)

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def private(self, event: object) -> None: ...

    def publish(self, message: object) -> bool:
        return True

    def resync(self, symbols: set[str], reason: str) -> None:
        self.resyncs.append(symbols)

    def private_gap(self, reason: str) -> None: ...


def test_a_spray_of_source_ids_cannot_grow_the_per_source_tables() -> None:
    """Every per-source table (and so every per-source metric series) stays within what the
    sequence tracker remembers, however many source ids a sender makes up."""
    from pushd.feed.intake import Intake
    from pushd.feed.sequencing import MAX_SOURCES

    sink = _Recorder()
    intake = Intake(sink, {"BTCUSDT"})
    for src in range(MAX_SOURCES + 300):
        intake.frame(wire.Envelope(src, 1, 1, [trade(src + 1)]), 0.0)
        intake.frame(wire.Envelope(src, 1, 3, [trade(src + 1)]), 0.0)  # a gap: counted per src
    assert len(intake.source_frames) == MAX_SOURCES
    assert len(intake.source_lost) == MAX_SOURCES
    assert len(intake._symbols_by_source) == MAX_SOURCES
    assert intake.lost_frames == MAX_SOURCES + 300
    last = MAX_SOURCES + 299
    assert intake.source_frames[last] == {"restart": 1, "gap": 1}
    assert len(sink.trades) == 2 * (MAX_SOURCES + 300)


def test_the_intakes_default_publish_limit_is_the_http_apis() -> None:
    """An ``Intake`` built without the daemon's policy limits a backend's publish as the HTTP
    API does by default (before, it took four times as much: 256 KiB against 64 KiB)."""
    assert Policy().publish_max_bytes == LimitsConfig().publish_max_bytes
