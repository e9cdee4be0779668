"""The authenticated engine link, attacked over real UDP and TCP sockets of a real daemon.

The daemon here takes sealed frames only (docs/wire.md): source 1 (market data) and source 2
(private events) have keys. A stranger knows the format and the port, not the keys. Each test is
one attack of issue 18 (items 6-9): it failed on the code before the seal.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from conftest import (
    SECRET,
    Client,
    Running,
    make_config,
    open_client,
    order,
    pushd_process,
    ready_ports,
    start_daemon,
    subscribed,
    trade,
)
from scrape import Scrape
from structlog.testing import capture_logs

from ingest import wire
from ingest.framing import Framer
from ingest.transport import TcpSender, UdpSender
from pushd.auth import issue_hmac_token
from pushd.config import Config
from pushd.feed.sequencing import CONFLICT_AFTER_S

KEYS = {
    1: b"market-data-key-of-the-ingest-auth-tests",
    2: b"private-key-of-the-ingest-auth-tests!!",
}
WRONG = b"a-key-the-daemon-does-not-know-at-all!!!"


def sealed_config(**ingest: Any) -> Config:
    """Keys for sources 1 and 2 (2 may carry private events); nothing unsealed."""
    sources = [
        {"id": 1, "key": KEYS[1].decode(), "silent_after_s": 0},
        {"id": 2, "key": KEYS[2].decode(), "private": True, "silent_after_s": 0},
    ]
    return make_config(ingest={"allow_unauthenticated": False, "sources": sources, **ingest})


async def sealed(nursery: trio.Nursery, **ingest: Any) -> Running:
    return await start_daemon(nursery, sealed_config(**ingest))


async def private_subscriber(running: Running, client: Client, uid: str) -> None:
    await client.call({"op": "auth", "token": running.token(uid)})
    reply = await client.call({"op": "subscribe", "channel": ["@order", "@balance", "@position"]})
    assert subscribed(reply, "@order", "@balance", "@position")


async def metrics(running: Running) -> Scrape:
    async with httpx.AsyncClient() as http:
        return Scrape((await http.get(f"{running.http_url}/metrics")).text)


def refused(scrape: Scrape, transport: str, reason: str) -> float:
    return scrape.value("pushd_ingest_refused_frames_total", transport=transport, reason=reason)


async def readyz(running: Running) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"{running.http_url}/readyz")


class Stranger:
    """Someone on the host who can send to the ingest ports but holds no key."""

    def __init__(self, running: Running) -> None:
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", running.ports.ingest_udp)

    async def send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.addr)

    async def envelope(self, src: int, epoch: int, seq: int, events: list[wire.Event]) -> None:
        """Unsealed, and sealed with a key of its own (a forged tag)."""
        body = wire.encode(wire.Envelope(src, epoch, seq, events))
        await self.send(body)
        await self.send(wire.seal(body, src, WRONG, now_ms()))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def trades_until(watcher: Client, last: int) -> list[int]:
    """The trade ids a @trades subscriber gets, up to and including ``last``."""
    ids: list[int] = []
    while last not in ids:
        ids += [t["id"] for t in (await watcher.recv())["data"]["trades"]]
    return ids


async def test_forged_fills_and_trades_reach_nobody(nursery: trio.Nursery) -> None:
    """Item 6: a forged "filled" for uid 1001 and a forged trade, unsealed, with a forged tag,
    or sealed for a source without a key, reach neither @order nor @trades nor the candles;
    the engine's own frames, sent after them, are the first anyone sees."""
    running = await sealed(nursery)
    stranger = Stranger(running)
    async with open_client(running.ws_url) as alice, open_client(running.ws_url) as watcher:
        await private_subscriber(running, alice, "1001")
        assert subscribed(await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"}),
                          "BTCUSDT@trades")  # fmt: skip
        await stranger.envelope(2, 1, 1, [order("1001", 666, "filled")])
        await stranger.envelope(1, 1, 1, [trade(666)])
        body = wire.encode(wire.Envelope(7, 1, 1, [order("1001", 667, "filled")]))
        await stranger.send(wire.seal(body, 7, WRONG, now_ms()))  # no key for source 7
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
        async with stream:  # the same over TCP: refused, and the connection dropped
            await stream.send_all(wire.frame_tcp(wire.Envelope(2, 1, 1, [order("1001", 668)])))
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""

        engine = TcpSender("127.0.0.1", running.ports.ingest_tcp, src=2, key=KEYS[2])
        market = UdpSender("127.0.0.1", running.ports.ingest_udp, src=1, key=KEYS[1])
        await engine.send([order("1001", 7)])
        await market.send([trade(5)])
        got = await alice.recv()
        assert (got["event"], got["data"]["order_id"]) == ("@order", 7)
        assert await trades_until(watcher, 5) == [5]
        await engine.aclose()
        market.close()
    assert running.daemon.markets.trades == 1  # the candles saw only the real trade
    scrape = await metrics(running)
    assert refused(scrape, "udp", "unsealed") == 2
    assert refused(scrape, "udp", "bad_mac") == 2
    assert refused(scrape, "udp", "unknown_source") == 1
    assert refused(scrape, "tcp", "unsealed") == 1
    assert scrape.value("pushd_ingest_tcp_peers_dropped_total", reason="refused") == 1


async def test_max_epoch_or_seq_from_a_stranger_changes_nothing(nursery: trio.Nursery) -> None:
    """Item 7: epoch 2^64-1 or seq 2^64-1 for the real source, unsealed or with a forged tag,
    and a replay of one of the engine's own datagrams: the engine's next frame is simply the
    next in order, and /readyz stays ready."""
    running = await sealed(nursery)
    stranger = Stranger(running)
    framer = Framer(src=2, key=KEYS[2])
    async with open_client(running.ws_url) as alice:
        await private_subscriber(running, alice, "1001")
        first = framer.frame([order("1001", 1)])
        await stranger.send(first)  # as the engine would: it is the real thing
        assert (await alice.recv())["data"]["order_id"] == 1
        await stranger.envelope(2, 2**64 - 1, 1, [order("1001", 666, "filled")])
        await stranger.envelope(2, framer.epoch, 2**64 - 1, [order("1001", 667, "filled")])
        await stranger.envelope(2, framer.epoch, 3, [order("1001", 668, "filled")])
        await stranger.send(first)  # captured and sent again
        await stranger.send(framer.frame([order("1001", 2)]))
        got = await alice.recv()
        assert (got["event"], got["data"]["order_id"], got["seq"]) == ("@order", 2, 2)
    assert running.daemon.intake.source_frames[2] == {"restart": 1, "in_order": 1, "duplicate": 1}
    assert running.daemon.intake.lost_frames == 0
    assert (await readyz(running)).status_code == 200


async def test_even_a_key_holder_cannot_silence_its_source(nursery: trio.Nursery) -> None:
    """A sealed frame (a buggy engine) with an epoch far ahead of the clock is refused; one
    with seq 2^64-1 is held until a second frame agrees with it, so the real stream goes on."""
    running = await sealed(nursery)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", running.ports.ingest_udp)
    real = Framer(src=2, key=KEYS[2])
    async with open_client(running.ws_url) as alice:
        await private_subscriber(running, alice, "1001")
        await sock.sendto(real.frame([order("1001", 1)]), addr)
        assert (await alice.recv())["data"]["order_id"] == 1
        ahead = Framer(src=2, epoch=2**64 - 1, key=KEYS[2])
        await sock.sendto(ahead.frame([order("1001", 666)]), addr)
        wild = wire.encode(wire.Envelope(2, real.epoch, 2**64 - 1, [order("1001", 667)]))
        await sock.sendto(wire.seal(wild, 2, KEYS[2], now_ms()), addr)
        await sock.sendto(real.frame([order("1001", 2)]), addr)
        got = await alice.recv()
        assert (got["event"], got["data"]["order_id"]) == ("@order", 2)
    assert running.daemon.intake.source_frames[2] == {"restart": 1, "jump": 1, "in_order": 1}
    assert refused(await metrics(running), "udp", "epoch_ahead") == 1
    sock.close()


async def test_a_stranger_cannot_make_private_subscribers_resync(nursery: trio.Nursery) -> None:
    """Item 8: a private event then a gap, from a source without a key (unsealed) and from a
    keyed source that may not carry private events: no resync notice, no private event."""
    running = await sealed(nursery)
    stranger = Stranger(running)
    market = Framer(src=1, key=KEYS[1])  # a real key, of the market-data source
    async with open_client(running.ws_url) as alice:
        await private_subscriber(running, alice, "1001")
        await stranger.envelope(50, 1, 1, [order("1001", 666)])
        await stranger.envelope(50, 1, 9, [trade(1)])
        with capture_logs() as logs:
            await stranger.send(market.frame([order("1001", 667, "filled")]))
            market.envelope([])  # a frame the daemon never gets: a gap on the market source
            await stranger.send(market.frame([trade(2)]))
            engine = TcpSender("127.0.0.1", running.ports.ingest_tcp, src=2, key=KEYS[2])
            await engine.send([order("1001", 7)])
            got = await alice.recv()
        assert not got.get("resync") and got["data"]["order_id"] == 7, got
        await engine.aclose()
    intake = running.daemon.intake
    assert intake.events["not_permitted"] == 1 and intake.lost_frames == 1
    told = [(e["event"], e["src"]) for e in logs if "private" in e["event"]]
    assert told == [("private events dropped: their source may not carry them", 1)]


async def test_two_engines_claiming_one_source_are_told(nursery: trio.Nursery) -> None:
    """Item 8: two engines with the key of one source (two epochs). The newer wins; the older
    one's frames are dropped, and once it goes on after its successor began, it is counted
    as a conflict and logged, not silently lost."""
    running = await sealed(nursery)
    older = UdpSender("127.0.0.1", running.ports.ingest_udp, src=1, epoch=10, key=KEYS[1])
    newer = UdpSender("127.0.0.1", running.ports.ingest_udp, src=1, epoch=20, key=KEYS[1])
    async with open_client(running.ws_url) as watcher:
        await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        await older.send([trade(1)])
        await newer.send([trade(2)])
        assert await trades_until(watcher, 2) == [1, 2]
        await older.send([trade(3)])  # a straggler, as far as anyone can tell
        await trio.sleep(CONFLICT_AFTER_S)  # the timer is the point: later, it is a second engine
        with capture_logs() as logs:
            await older.send([trade(4)])
            await newer.send([trade(5)])
            assert await trades_until(watcher, 5) == [5]
    scrape = await metrics(running)
    assert scrape.value("pushd_ingest_source_frames_total", source="1", verdict="conflict") == 1
    assert running.daemon.intake.source_frames[1]["stale"] == 1
    assert [e["src"] for e in logs if e["event"] == "two engines send as one source"] == [1]
    older.close()
    newer.close()


async def test_idle_tcp_peers_cannot_keep_the_engine_out(nursery: trio.Nursery) -> None:
    """Item 9: 70 idle connections (more than max_tcp_peers) do not keep the engine out, and
    every one of them is dropped by the auth timeout."""
    running = await sealed(nursery, auth_timeout_s=1.0)
    port = running.ports.ingest_tcp
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(70)]
    await trio.testing.wait_all_tasks_blocked()  # the daemon took them all: 64 wait, 6 went
    assert len(running.daemon.tcp_peers.waiting) == 64
    async with open_client(running.ws_url) as alice:
        await private_subscriber(running, alice, "1001")
        engine = TcpSender("127.0.0.1", port, src=2, key=KEYS[2])
        await engine.send([order("1001", 1)])
        assert (await alice.recv())["data"]["order_id"] == 1
        with trio.fail_after(5):  # 1 s of auth timeout, and some slack
            for stream in idle:
                with contextlib.suppress(trio.BrokenResourceError):  # reset: dropped as well
                    assert await stream.receive_some(10) == b""
        await engine.send([order("1001", 2)])  # the engine's connection stays
        assert (await alice.recv())["data"]["order_id"] == 2
        await engine.aclose()
    peers = running.daemon.tcp_peers
    assert not peers.waiting
    assert peers.dropped == {"evicted": 7, "auth_timeout": 63}
    for stream in idle:
        await stream.aclose()


async def test_a_stranger_announcing_a_huge_frame_is_dropped_at_its_length(
    nursery: trio.Nursery,
) -> None:
    """Until a TCP peer has authenticated, its first frame may be at most
    ``wire.MAX_FIRST_FRAME_BYTES``: a stranger announcing a 4 MiB frame is dropped at its length
    prefix (refused), long before its auth timeout, so 64 waiting strangers cannot make pushd
    buffer (and MAC) 4 MiB each. The engine, once admitted, may still send frames that large."""
    running = await sealed(nursery, auth_timeout_s=60.0)
    stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    async with stream:
        await stream.send_all(wire.LENGTH_PREFIX.pack(wire.MAX_FRAME_BYTES) + b"\x00" * 1024)
        with trio.fail_after(10):  # the auth timeout is 60 s: only the length can end it
            with contextlib.suppress(trio.BrokenResourceError):  # reset: closed with our bytes
                assert await stream.receive_some(10) == b""
    assert running.daemon.tcp_peers.dropped == {"refused": 1}
    scrape = await metrics(running)
    assert scrape.value("pushd_ingest_tcp_peers_dropped_total", reason="refused") == 1
    async with open_client(running.ws_url) as watcher:
        await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        engine = TcpSender("127.0.0.1", running.ports.ingest_tcp, src=1, key=KEYS[1])
        await engine.connect()  # its hello is small; then one frame over the first frame's limit
        big = [trade(i) for i in range(1, 2001)]
        assert len(wire.frame_tcp(wire.Envelope(1, 1, 1, big))) > wire.MAX_FIRST_FRAME_BYTES
        await engine.send(big)
        assert await trades_until(watcher, 2000) == list(range(1, 2001))
        await engine.aclose()


async def test_a_source_refused_or_silent_is_not_ready(nursery: trio.Nursery) -> None:
    """A keyed source with no valid frame for its silent_after_s is down in /readyz and
    pushd_ingest_source_up; frames with a wrong key say why; a valid one brings it back.

    The daemon's real timer is the point here (the boundaries are in test_ingest_seal, on a
    clock passed in): the wait only outlives silent_after_s, which a slow machine lengthens
    and never shortens, and the source, once back, beats on, so no window is timed."""
    sources = [
        {"id": 1, "key": KEYS[1].decode(), "silent_after_s": 3.0},
        {"id": 2, "key": KEYS[2].decode(), "silent_after_s": 0},  # marks what has been read
    ]
    running = await start_daemon(nursery, make_config(ingest={
        "allow_unauthenticated": False, "sources": sources}))  # fmt: skip
    stranger = Stranger(running)
    marker = UdpSender("127.0.0.1", running.ports.ingest_udp, src=2, key=KEYS[2])
    async with open_client(running.ws_url) as watcher:
        await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
        await trio.sleep(3.1)  # the real silence timer is the point: a slow machine only adds
        answer = await readyz(running)
        assert answer.status_code == 503
        assert answer.json()["reason"].startswith("engine source 1: not heard from in")
        await stranger.envelope(1, 1, 1, [trade(1)])  # a wrong key: still down, and why
        await marker.send([trade(2)])  # read after the stranger's datagrams
        assert await trades_until(watcher, 2) == [2]
        answer = await readyz(running)
        assert answer.json()["reason"].startswith("engine source 1: only refused frames (bad_mac)")
        assert (await metrics(running)).value("pushd_ingest_source_up", source="1") == 0
        market = UdpSender("127.0.0.1", running.ports.ingest_udp, src=1, key=KEYS[1])
        async with trio.open_nursery() as beats:
            beats.start_soon(beat_on, market)
            await marker.send([trade(3)])
            assert await trades_until(watcher, 3) == [3]
            assert (await metrics(running)).value("pushd_ingest_source_up", source="1") == 1
            assert (await readyz(running)).status_code == 200
            beats.cancel_scope.cancel()
    market.close()
    marker.close()


async def beat_on(sender: UdpSender) -> None:
    """An engine idle but alive: a heartbeat every 0.2 s, far within silent_after_s."""
    while True:
        await sender.heartbeat()
        await trio.sleep(0.2)


# -- the command line: run refuses an open ingest, sim and demo seal ---------------------------

PUSHD = [sys.executable, "-m", "pushd"]


def test_run_refuses_an_unauthenticated_ingest(tmp_path: Path) -> None:
    config = tmp_path / "pushd.toml"
    config.write_text("[auth.hmac]\nsecret = 's'\n")
    result = subprocess.run([*PUSHD, "run", "--config", str(config)], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ingest: no [[ingest.sources]] keys" in result.stderr
    assert "allow_unauthenticated" in result.stderr
    sim = subprocess.run([*PUSHD, "sim", "--config", str(config)], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    assert sim.returncode == 2
    assert "sources 1 (market data) and 2 (private events)" in sim.stderr


async def test_sim_seals_with_the_keys_of_the_config_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`pushd sim --config` reads the keys from the file pushd reads: its frames are taken."""
    running = await sealed(nursery)
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[ingest]\nudp_port = {running.ports.ingest_udp}\ntcp_port = {running.ports.ingest_tcp}\n"
        f"sources = [{{id = 1, key = '{KEYS[1].decode()}'}},\n"
        f"  {{id = 2, key = '{KEYS[2].decode()}', private = true}}]\n"
        "[engine]\nsnapshot_port = 0\n[log]\nformat = 'json'\n"  # nobody polls it here
    )
    process = await trio.lowlevel.open_process(
        [*PUSHD, "sim", "--config", str(config), "--rate", "20", "--step-ms", "20"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with open_client(running.ws_url) as watcher:
            await watcher.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
            with trio.fail_after(15):
                assert (await watcher.recv())["data"]["trades"]
    finally:
        process.kill()
        await process.wait()
    intake = running.daemon.intake
    assert sum(intake.refused.values()) == 0 and intake.frames["bad"] == 0
    assert intake.source_frames[1]["restart"] == 1 and intake.source_frames[2]["restart"] == 1


async def test_demo_seals_its_feed_and_logs_no_key(tmp_path: Path) -> None:
    """`pushd demo` with keys in its config (one from a file): its simulator's frames are all
    taken, both sources are up, and no key appears in a debug log."""
    key_file = tmp_path / "market.key"
    key_file.write_text(KEYS[1].decode() + "\n")
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = '{SECRET}'\n"
        "[ingest]\nudp_port = 0\ntcp_port = 0\n"
        f"sources = [{{id = 1, key_file = '{key_file}'}},\n"
        f"  {{id = 2, key = '{KEYS[2].decode()}', private = true}}]\n"
        "[engine]\nsnapshot_port = 0\n[log]\nformat = 'json'\nlevel = 'debug'\n"
        "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"  # a demo serves both
    )
    command = [*PUSHD, "demo", "--config", str(config), "--history-h", "0"]
    async with pushd_process(command) as (process, logs):
        ws, http = ready_ports(logs).websocket, ready_ports(logs).http
        async with open_client(f"ws://127.0.0.1:{ws}/ws") as c:
            await c.call({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 60)})
            await c.call({"op": "subscribe", "channel": ["BTCUSDT@trades", "@balance"]})
            with trio.fail_after(15):
                seen = {(await c.recv())["event"] for _ in range(2)}
            while seen != {"BTCUSDT@trades", "@balance"}:
                with trio.fail_after(15):
                    seen.add((await c.recv())["event"])
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{http}/metrics")).text
        process.terminate()
        await process.wait()
        with trio.fail_after(10):
            await logs.until("stopped")
    scrape = Scrape(text)
    assert scrape.total("pushd_ingest_refused_frames_total") == 0
    for src in ("1", "2"):
        assert scrape.value("pushd_ingest_source_up", source=src) == 1
    logged = "\n".join(map(str, logs.lines))
    assert "ingest peer authenticated" in logged
    assert KEYS[1].decode() not in logged and KEYS[2].decode() not in logged
