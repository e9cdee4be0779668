"""Clients that stop reading: they never cost the others anything, and each stream's policy holds.

The slow client is a bare socket with a tiny receive buffer that does not read while the test
publishes several megabytes; the server's outbound buffer for it is 64 KiB.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from conftest import RawClient, Running, make_config, open_client, start_daemon
from wsproto.events import AcceptConnection

from pushd.errors import CloseCode
from pushd.gateway.connection import unsent_bytes
from pushd.gateway.writer import linger_s

PAYLOAD = {"pad": "x" * 16_000}
COUNT = 400  # 6.4 MB: far more than the kernel buffers plus the 64 KiB outbound buffer


async def slow_daemon(nursery: trio.Nursery) -> Running:
    config = make_config(limits={"outbound_buffer_bytes": 65536, "stall_timeout_s": 60.0,
                                 "close_timeout_s": 30.0})  # fmt: skip
    return await start_daemon(nursery, config)


def stalled(running: Running) -> float:
    """Connections the server ended as stalled (prometheus' public registry API; no sample yet
    is none)."""
    value = running.daemon.registry.get_sample_value(
        "pushd_connections_closed_by_server_total", {"reason": "stalled"}
    )
    return value or 0.0


async def stalled_client(running: Running, *requests: dict[str, object]) -> RawClient:
    """A client that sends its requests, reads their replies, and then stops reading."""
    raw = await RawClient.connect(running.ports.websocket, rcvbuf=4096)
    assert isinstance(await raw.handshake(), AcceptConnection)
    replies: list[object] = []
    for request in requests:
        await raw.send_json(request)
    while len(replies) < len(requests):
        more, _ = await raw.read_one_batch()
        replies += more
    assert all(isinstance(r, dict) and r.get("result") for r in replies), replies
    return raw


async def test_public_stream_drops_for_the_slow_one_then_resyncs(nursery: trio.Nursery) -> None:
    running = await slow_daemon(nursery)
    raw = await stalled_client(running, {"op": "subscribe", "channel": "BTCUSDT@trades"})
    async with open_client(running.ws_url, max_message_size=1 << 20) as fast:
        await fast.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        assert running.daemon.hub.subscriber_count("trades_BTCUSDT") == 2

        received = []
        for _ in range(COUNT // 2):  # in step with the reader, whose buffer holds 4 of these
            await running.publish_batch([{"channel": "trades_BTCUSDT", "data": PAYLOAD}] * 2)
            received += [(await fast.recv())["seq"] for _ in range(2)]

        assert received == list(range(1, COUNT + 1))  # the reader got everything, in order
        assert running.daemon.hub.dropped > 0  # while the slow one lost some

        after = await running.publish("trades_BTCUSDT", {"after": True})  # dropped: still lagging
        messages: list[dict[str, object]] = []  # the slow client finally reads
        while not any(m.get("resync") for m in messages):
            messages += (await raw.read_one_batch())[0]  # the drain goes on as it reads
        await running.publish("trades_BTCUSDT", {"resumed": True})
        while messages[-1].get("seq") != after + 1:
            messages += (await raw.read_one_batch())[0]

        seqs = [m["seq"] for m in messages if "data" in m]
        resync = [m for m in messages if m.get("resync")]
        assert len(resync) == 1 and resync[0]["event"] == "BTCUSDT@trades"
        assert resync[0]["seq"] == after
        first_run = seqs[: seqs.index(after + 1)]
        assert first_run == list(range(1, len(first_run) + 1))  # a gap-free prefix ...
        assert len(first_run) < COUNT  # ... that stopped when the buffer filled
        assert messages[-1] == {"event": "BTCUSDT@trades", "data": {"resumed": True},
                                "seq": after + 1, "epoch": running.epoch}  # fmt: skip
    await raw.aclose()


async def test_private_stream_overflow_closes_with_4002(nursery: trio.Nursery) -> None:
    running = await slow_daemon(nursery)
    raw = await stalled_client(
        running,
        {"op": "auth", "token": running.token("1001")},
        {"op": "subscribe", "channel": "@order"},
    )
    async with open_client(running.ws_url) as other:
        await other.call({"op": "auth", "token": running.token("1002")})
        await other.call({"op": "subscribe", "channel": "@order"})
        for _ in range(COUNT // 2):
            await running.publish_batch([{"channel": "user_1001_order", "data": PAYLOAD}] * 2)
        seq = await running.publish("user_1002_order", {"ok": 1})
        assert await other.recv() == {
            "event": "@order",
            "data": {"ok": 1},
            "seq": seq,
            "epoch": running.epoch,
        }

    messages, code = await raw.read_until_close()
    assert code == CloseCode.SLOW_CONSUMER
    seqs = [m["seq"] for m in messages if m.get("event") == "@order"]
    assert seqs == list(range(1, len(seqs) + 1))  # what it got has no gap; then the close
    assert 0 < len(seqs) < COUNT
    await raw.aclose()


async def test_client_that_never_reads_is_closed_after_stall_timeout(
    nursery: trio.Nursery,
) -> None:
    config = make_config(limits={"outbound_buffer_bytes": 65536, "stall_timeout_s": 0.5})
    running = await start_daemon(nursery, config)
    raw = await stalled_client(running, {"op": "subscribe", "channel": "BTCUSDT@trades"})
    with trio.fail_after(20):  # once the kernel buffers are full, a write waits: 0.5 s of that
        while running.daemon.gateway.connections:
            await running.publish_batch([{"channel": "trades_BTCUSDT", "data": PAYLOAD}] * 10)
    assert stalled(running) == 1
    await raw.aclose()


async def test_slow_consumer_close_reaches_a_client_that_reads_late(nursery: trio.Nursery) -> None:
    """Defaults (2 s close timeout): the 4002 close frame comes right after what the kernel
    already holds, not after a backlog the client cannot use, so it is read, not a 1006."""
    config = make_config(limits={"outbound_buffer_bytes": 65536})
    running = await start_daemon(nursery, config)
    raw = await stalled_client(
        running,
        {"op": "auth", "token": running.token("1001")},
        {"op": "subscribe", "channel": "@order"},
    )
    for _ in range(COUNT // 20):
        await running.publish_batch([{"channel": "user_1001_order", "data": PAYLOAD}] * 20)
    messages, code = await raw.read_until_close()
    assert code == CloseCode.SLOW_CONSUMER
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap before the close
    await raw.aclose()


async def test_socket_send_buffer_is_bounded(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.call({"op": "ping"})
        (conn,) = running.daemon.gateway.connections
        # Linux doubles the value asked for (bookkeeping): 64 KiB asked, 128 KiB held at most
        assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536


async def test_a_slow_reader_that_takes_bytes_is_not_stalled(nursery: trio.Nursery) -> None:
    """Stall detection counts bytes leaving the kernel's queue, not writability: a reader that
    takes 4 KiB every 100 ms for 3 s (never enough to make the socket writable) survives a
    1 s stall timeout; when it stops reading it is closed."""
    config = make_config(limits={"outbound_buffer_bytes": 65536, "stall_timeout_s": 1.0})
    running = await start_daemon(nursery, config)
    raw = await stalled_client(running, {"op": "subscribe", "channel": "BTCUSDT@trades"})
    (conn,) = running.daemon.gateway.connections
    async with open_client(running.ws_url) as fence:
        for _ in range(10):  # until the kernel buffers are full and a drain waits for the reader
            await running.publish_batch([{"channel": "trades_BTCUSDT", "data": PAYLOAD}] * 8)
            await fence.call({"op": "ping"})  # its pong goes out after that flush
            if conn.draining:
                break
    assert conn.draining
    for _ in range(30):  # the pace of a slow mobile link, not a synchronisation
        await trio.sleep(0.1)
        await raw.stream.receive_some(4096)
    assert conn in running.daemon.gateway.connections
    assert stalled(running) == 0
    for _ in range(4):  # now it stops reading altogether, with more to send than fits
        await running.publish_batch([{"channel": "trades_BTCUSDT", "data": PAYLOAD}] * 8)
    with trio.fail_after(10):
        await running.daemon.gateway.wait_idle()
    assert stalled(running) == 1
    await raw.aclose()


async def test_non_readers_cost_readers_nothing_and_memory_stays_bounded(
    nursery: trio.Nursery,
) -> None:
    config = make_config(limits={"outbound_buffer_bytes": 65536, "stall_timeout_s": 60.0})
    running = await start_daemon(nursery, config)
    everything = {"op": "subscribe", "channel": ["BTCUSDT@trades", "ETHUSDT@trades", "notice"]}
    stalled = [await stalled_client(running, everything) for _ in range(40)]
    async with open_client(running.ws_url) as a, open_client(running.ws_url) as b:
        for reader in (a, b):
            await reader.call(everything)
        got: dict[int, list[int]] = {id(a): [], id(b): []}
        for _ in range(60):  # 60 x 4 x 16 kB = 3.8 MB to each of 42 clients
            batch = [{"channel": ch, "data": PAYLOAD} for ch in ("trades_BTCUSDT", "notice") * 2]
            await running.publish_batch(batch)
            for reader in (a, b):
                got[id(reader)] += [(await reader.recv())["seq"] for _ in range(4)]
        for seqs in got.values():  # each channel's seqs 1..120 in order, no gap
            assert sorted(seqs) == sorted(list(range(1, 121)) * 2)
        gateway = running.daemon.gateway
        slow = [c for c in gateway.connections if c.outlet.lagging]
        assert len(slow) == 40
        for conn in slow:  # what one non-reader can hold: outbound buffer + kernel send buffer
            assert len(conn.outlet.out) <= 65536
            assert unsent_bytes(conn.sock) <= 2 * 65536
    for raw in stalled:
        await raw.aclose()


async def test_the_flusher_yields_within_a_round(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round over many connections lets other tasks run between slices (here a slice of
    zero seconds: a yield every 64 connections), so no round blocks the loop for long."""
    from pushd.daemon import Daemon
    from pushd.gateway import writer
    from pushd.gateway.connection import Connection, Traffic
    from pushd.gateway.hub import text_frame

    monkeypatch.setattr(writer, "FLUSH_SLICE_S", 0.0)
    daemon = Daemon(make_config())
    gateway = daemon.gateway
    pairs = [socket.socketpair() for _ in range(640)]
    conns = []
    for ours, _theirs in pairs:
        ours.setblocking(False)
        conn = Connection(ours, "127.0.0.1", "test", len(conns), 65536, daemon.hub, Traffic())
        conn.life.opened()
        conn.nursery = nursery
        conns.append(conn)
    nursery.start_soon(gateway.flusher.run)
    await trio.testing.wait_all_tasks_blocked()
    written: list[int] = []  # how many connections had been written each time the probe ran

    async def probe() -> None:
        while True:
            written.append(sum(1 for c in conns if not c.outlet.out))
            await trio.lowlevel.checkpoint()

    frame = text_frame(b'{"x":1}')
    for conn in conns:
        daemon.hub.send(conn.outlet, frame)
    nursery.start_soon(probe)
    with trio.fail_after(10):
        while any(c.outlet.out for c in conns):
            await trio.lowlevel.checkpoint()
    assert any(0 < n < len(conns) for n in written)  # the probe ran in the middle of the round
    assert all(theirs.recv(100) == frame for _ours, theirs in pairs)
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_a_busy_loop_lingers_before_a_round_and_an_idle_one_does_not() -> None:
    """The flusher's wait (sans-IO): frames wanted out again before the loop was idle for as
    long as the last round took mean publishers keep it busy; then rounds wait coalesce_ms."""
    last_end, last_round = 10.0, 0.008  # a round over 1,000 connections took 8 ms
    assert linger_s(5.0, last_end + 0.001, last_end, last_round) == 0.004  # busy: half a round
    assert linger_s(2.0, last_end + 0.001, last_end, last_round) == 0.002  # ... at most this
    assert linger_s(5.0, last_end + 0.009, last_end, last_round) == 0.0  # idle long enough
    assert linger_s(0.0, last_end + 0.001, last_end, last_round) == 0.0  # coalescing off
    assert linger_s(5.0, last_end + 0.0001, last_end, 0.002) == 0.0  # cheap rounds: never
