"""Authenticated TCP peers that hold a slot without using it, against a real daemon over real
sockets: one silent after its hello, one sending only refused frames (replays, forged tags),
one asking for acks it never reads. Each is closed and its slot freed; a sender that beats
(docs/wire.md: a heartbeat when idle for a second) is not.

The daemon's real timers are the point: each wait only outlives a timer, which a slow machine
lengthens and never shortens."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Running, make_config
from test_engine_publish import Link
from test_ingest_auth import KEYS, WRONG, metrics, now_ms, sealed

from ingest import wire
from ingest.framing import Framer
from pushd.errors import ConfigError


async def closed_by_daemon(stream: trio.SocketStream, limit_s: float) -> None:
    """Wait (reading) until pushd closes ``stream``, then until it has counted why (the
    daemon runs in this process); fail after ``limit_s``."""
    with trio.fail_after(limit_s):
        with contextlib.suppress(trio.BrokenResourceError):  # reset: closed as well
            while await stream.receive_some(65536):
                pass
    await trio.testing.wait_all_tasks_blocked()


async def idle_daemon(nursery: trio.Nursery, **ingest: Any) -> Running:
    return await sealed(nursery, max_tcp_peers=1, **ingest)


async def test_a_silent_authenticated_peer_is_closed_and_its_slot_freed(
    nursery: trio.Nursery,
) -> None:
    """With one slot, a peer that authenticates and then says nothing is closed after
    ``peer_idle_s``; the engine then gets the slot (before, the silent peer held it forever
    and the engine was dropped as "full")."""
    running = await idle_daemon(nursery, peer_idle_s=2.0)
    silent = await Link.open(running, 1, KEYS[1])
    await closed_by_daemon(silent.stream, 10)
    peers = running.daemon.tcp_peers
    assert peers.dropped == {"idle": 1}
    assert peers.authenticated == 0
    engine = await Link.open(running, 2, KEYS[2])  # its hello is acked: admitted
    assert (await engine.send([wire.Heartbeat()])).verdict == "in_order"
    scrape = await metrics(running)
    assert scrape.value("pushd_ingest_tcp_peers_dropped_total", reason="idle") == 1
    await engine.stream.aclose()
    await silent.stream.aclose()


async def test_a_peer_sending_only_refused_frames_is_closed_as_idle(
    nursery: trio.Nursery,
) -> None:
    """After its hello, a peer sends only what is not accepted: its hello replayed (a
    duplicate inside the replay window, still a valid seal), a frame sealed long ago (expired)
    and one with a forged tag. None of them resets the idle timer: it is closed."""
    running = await idle_daemon(nursery, peer_idle_s=2.0)
    stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    framer = Framer(1, key=KEYS[1])
    hello = framer.tcp_frame([wire.Heartbeat()])
    await stream.send_all(hello)
    body = wire.encode(framer.envelope([wire.Heartbeat()]))
    expired = wire.length_prefixed(wire.seal(body, 1, KEYS[1], now_ms() - 3_600_000))
    forged = wire.length_prefixed(wire.seal(body, 1, WRONG, now_ms()))

    async def refused_frames() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # closed: the point
            while True:
                await stream.send_all(hello + expired + forged)
                await trio.sleep(0.2)  # pacing, not synchronisation

    async with trio.open_nursery() as senders:
        senders.start_soon(refused_frames)
        await closed_by_daemon(stream, 10)
        senders.cancel_scope.cancel()
    assert running.daemon.tcp_peers.dropped == {"idle": 1}
    frames = running.daemon.intake.source_frames[1]
    assert frames["restart"] == 1 and frames["duplicate"] >= 1
    await stream.aclose()
    engine = await Link.open(running, 2, KEYS[2])  # the slot is free
    await engine.stream.aclose()


async def test_a_replayed_first_frame_does_not_admit_a_peer(nursery: trio.Nursery) -> None:
    """A frame captured on the network (the engine's hello, validly sealed) and sent again as
    a new connection's first frame is a duplicate: it admits nobody, so the replayer holds no
    slot and is dropped as any peer that never authenticates: evicted when the engine comes
    back and needs the room (else at ``auth_timeout_s``). Before, it was admitted and held the
    one slot until ``peer_idle_s`` (30 s here), and the engine was dropped as "full"."""
    running = await idle_daemon(nursery, peer_idle_s=30.0, auth_timeout_s=1.0)
    framer = Framer(1, key=KEYS[1])
    hello = framer.tcp_frame([wire.Heartbeat()])
    engine = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    await engine.send_all(hello)
    await trio.testing.wait_all_tasks_blocked()
    peers = running.daemon.tcp_peers
    assert peers.authenticated == 1
    await engine.aclose()  # the engine's link drops; its hello was seen on the way
    await trio.testing.wait_all_tasks_blocked()
    replayer = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    await replayer.send_all(hello)
    await trio.testing.wait_all_tasks_blocked()
    assert running.daemon.intake.source_frames[1]["duplicate"] == 1
    assert peers.authenticated == 0  # waiting, holding no slot
    back = await Link.open(running, 1, KEYS[1])  # the engine restarted: the slot is its
    assert peers.authenticated == 1
    await closed_by_daemon(replayer, 10)
    assert peers.dropped == {"evicted": 1}
    assert (await back.send([wire.Heartbeat()])).verdict == "in_order"
    await back.stream.aclose()
    await replayer.aclose()


async def test_a_replayer_alone_is_dropped_at_the_auth_timeout(nursery: trio.Nursery) -> None:
    """A peer that only ever sends a captured frame again (paced, so nothing else ends it) is
    never admitted and is dropped at ``auth_timeout_s``, not kept to ``peer_idle_s``."""
    running = await idle_daemon(nursery, peer_idle_s=30.0, auth_timeout_s=1.0)
    hello = Framer(1, key=KEYS[1]).tcp_frame([wire.Heartbeat()])
    async with await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp) as engine:
        await engine.send_all(hello)  # the engine's, seen on the wire
        await trio.testing.wait_all_tasks_blocked()
    await trio.testing.wait_all_tasks_blocked()
    replayer = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)

    async def replay() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # closed: the point
            while True:
                await replayer.send_all(hello)
                await trio.sleep(0.2)  # pacing, not synchronisation

    async with trio.open_nursery() as senders:
        senders.start_soon(replay)
        await closed_by_daemon(replayer, 10)
        senders.cancel_scope.cancel()
    peers = running.daemon.tcp_peers
    assert peers.dropped == {"auth_timeout": 1} and peers.authenticated == 0
    assert running.daemon.intake.source_frames[1]["duplicate"] >= 2
    await replayer.aclose()


async def test_a_waiting_peer_that_never_reads_its_acks_is_counted(
    nursery: trio.Nursery,
) -> None:
    """A peer not admitted yet (its frames are duplicates: answered, admitting nobody) that
    asks for acks and never reads them is closed at ``ack_timeout_s`` and counted as
    ``ack_stalled`` like an admitted one (before: closed, but neither counted nor logged)."""
    running = await sealed(nursery, max_tcp_peers=2, ack_timeout_s=1.0, auth_timeout_s=30.0)
    framer = Framer(1, key=KEYS[1])
    hello = framer.tcp_frame([wire.Heartbeat()], ack=True)
    engine = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    await engine.send_all(hello)  # seen once: every later copy is a duplicate
    await trio.testing.wait_all_tasks_blocked()
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", running.ports.ingest_tcp))
    deaf = trio.SocketStream(sock)
    with trio.fail_after(30):
        with contextlib.suppress(trio.BrokenResourceError):  # reset by pushd: the point
            while True:
                await deaf.send_all(hello * 500)
    await trio.testing.wait_all_tasks_blocked()  # pushd's peer task has counted it
    assert running.daemon.tcp_peers.dropped == {"ack_stalled": 1}
    await engine.aclose()
    await deaf.aclose()


async def test_an_engine_that_numbered_on_while_disconnected_gets_back_in(
    nursery: trio.Nursery,
) -> None:
    """An engine whose link was down while it went on numbering frames (more than the jump
    limit: its first frame back is a *jump*, held until the next confirms it) is admitted:
    only a key holder can seal a frame that far ahead, and refusing it would keep the engine
    out for good (every retry jumps again)."""
    running = await idle_daemon(nursery, peer_idle_s=30.0)
    link = await Link.open(running, 1, KEYS[1])
    await link.stream.aclose()
    for _ in range(2000):  # frames the engine could not send: pushd sees them lost
        link.framer.envelope([wire.Heartbeat()])
    await trio.testing.wait_all_tasks_blocked()
    back = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    link.stream, link.acks = back, wire.StreamDecoder()
    assert (await link.send([wire.Heartbeat()])).verdict == "jump"
    assert running.daemon.tcp_peers.authenticated == 1
    assert (await link.send([wire.Heartbeat()])).verdict == "gap"
    await back.aclose()


async def test_a_backend_resending_its_unacked_frame_first_is_answered(
    nursery: trio.Nursery,
) -> None:
    """A backend whose link dropped before it read an ack resends that frame first on its new
    connection: it is answered (a duplicate: it was taken), and the connection goes on; the
    backend is admitted by its next fresh frame."""
    running = await idle_daemon(nursery, peer_idle_s=30.0)
    link = await Link.open(running, 1, KEYS[1])
    frame = link.framer.tcp_frame([wire.Heartbeat()], ack=True)
    await link.stream.send_all(frame)
    assert (await link.ack()).verdict == "in_order"
    await link.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    link.stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
    link.acks = wire.StreamDecoder()
    await link.stream.send_all(frame)
    assert (await link.ack()).verdict == "duplicate"
    assert running.daemon.tcp_peers.authenticated == 0
    assert (await link.send([wire.Heartbeat()])).verdict == "in_order"
    assert running.daemon.tcp_peers.authenticated == 1
    await link.stream.aclose()


async def test_a_peer_that_never_reads_its_acks_is_closed(nursery: trio.Nursery) -> None:
    """A peer asks for acks and never reads them: once pushd's ack write has been blocked for
    ``ack_timeout_s`` it is closed (before, its task waited in the write forever, holding its
    slot); another peer is served meanwhile and after."""
    running = await sealed(nursery, max_tcp_peers=2, ack_timeout_s=1.0, peer_idle_s=0)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", running.ports.ingest_tcp))
    deaf = trio.SocketStream(sock)
    framer = Framer(1, key=KEYS[1])
    engine = await Link.open(running, 2, KEYS[2])
    with trio.fail_after(30):
        with contextlib.suppress(trio.BrokenResourceError):  # reset by pushd: the point
            while True:
                batch = b"".join(framer.tcp_frame([wire.Heartbeat()], ack=True) for _ in range(500))
                await deaf.send_all(batch)
    await trio.testing.wait_all_tasks_blocked()  # pushd's peer task has counted it
    assert running.daemon.tcp_peers.dropped == {"ack_stalled": 1}
    assert (await engine.send([wire.Heartbeat()])).verdict == "in_order"
    await engine.stream.aclose()
    await deaf.aclose()


async def test_a_beating_peer_outlives_the_idle_timer(nursery: trio.Nursery) -> None:
    """A sender that beats every 0.5 s, as senders do when idle (each beat's ack awaited), is
    not closed by an idle time of 1.5 s, however long it stays."""
    running = await idle_daemon(nursery, peer_idle_s=2.0)
    link = await Link.open(running, 1, KEYS[1])
    started = trio.current_time()
    beats = 0
    while trio.current_time() - started < 4.0:  # well past the idle time
        await trio.sleep(0.5)  # the sender's pace, not synchronisation
        assert (await link.send([wire.Heartbeat()])).verdict == "in_order"
        beats += 1
    assert beats >= 7
    assert running.daemon.tcp_peers.dropped == {}
    assert running.daemon.tcp_peers.authenticated == 1
    await link.stream.aclose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("peer_idle_s", -1.0),
        ("peer_idle_s", 3601.0),
        ("peer_idle_s", 1.0),  # below twice the senders' 1 s beat: healthy links would go
        ("ack_timeout_s", 0.0),
        ("ack_timeout_s", 601),
    ],
)
def test_the_timers_are_checked_like_the_other_fields(field: str, value: float) -> None:
    """A negative idle time, one a beating sender cannot meet, or no ack time at all is refused
    at load, naming the field; ``peer_idle_s = 0`` (never) and 2 s are taken."""
    with pytest.raises(ConfigError, match=field):
        make_config(ingest={field: value})
    assert make_config(ingest={"peer_idle_s": 0}).ingest.peer_idle_s == 0
    assert make_config(ingest={"peer_idle_s": 2}).ingest.peer_idle_s == 2
