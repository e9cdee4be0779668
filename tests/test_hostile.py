"""Peers that misbehave on purpose: each ends at most itself, never the daemon or anyone's data.

Every test here ends by proving the daemon still serves (a fresh client gets a pong), and most
by checking that the hostile connection ended the way docs/protocol.md says.
"""

from __future__ import annotations

import socket
import struct

import httpx
import pytest
import trio
from conftest import RawClient, Running, make_config, open_client, start_daemon
from wsproto.events import AcceptConnection, CloseConnection, Ping, TextMessage

from pushd.errors import CloseCode


async def still_serves(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        assert (await c.call({"op": "ping"}))["op"] == "pong"


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0), as a crashed or hostile peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def raw_open(running: Running) -> RawClient:
    raw = await RawClient.connect(running.ports.websocket)
    assert isinstance(await raw.handshake(), AcceptConnection)
    return raw


# -- control frames while the server is closing ------------------------------------------------


async def test_ping_after_oversize_message_is_not_fatal(running: Running) -> None:
    raw = await raw_open(running)
    big = '{"op":"ping","pad":"' + "x" * 10_000 + '"}'
    await raw.send_raw(raw.ws.send(TextMessage(big)) + raw.ws.send(Ping(b"keepalive")))
    _, code = await raw.read_until_close()
    assert code == CloseCode.MESSAGE_TOO_BIG
    await raw.aclose()
    await still_serves(running)


async def test_ping_during_every_server_close(nursery: trio.Nursery) -> None:
    config = make_config(limits={"messages_per_second": 1.0, "message_burst": 2})
    running = await start_daemon(nursery, config)
    # 4001: a request flood, then pings and more text while the close is under way
    raw = await raw_open(running)
    flood = b"".join(raw.ws.send(TextMessage('{"op":"ping"}')) for _ in range(5))
    await raw.send_raw(flood + raw.ws.send(Ping(b"a")) + raw.ws.send(TextMessage("{}")))
    _, code = await raw.read_until_close()
    assert code == CloseCode.RATE_LIMITED
    await raw.aclose()
    # 4003: kicked by the operator, then a ping
    raw = await raw_open(running)
    await raw.send_json({"op": "auth", "token": running.token("7")})
    await raw.read_one_batch()
    assert running.daemon.gateway.kick("7") == 1
    await raw.send_raw(raw.ws.send(Ping(b"b")))
    _, code = await raw.read_until_close()
    assert code == CloseCode.KICKED
    await raw.aclose()
    await still_serves(running)


async def test_ping_during_shutdown(nursery: trio.Nursery) -> None:
    running = await start_daemon(nursery, make_config())
    raw = await raw_open(running)
    running.daemon.stop()
    await raw.send_raw(raw.ws.send(Ping(b"c")) + raw.ws.send(Ping(b"d")))
    _, code = await raw.read_until_close()
    assert code == CloseCode.GOING_AWAY
    await raw.aclose()
    with trio.fail_after(10):
        await running.daemon.stopped.wait()


async def test_close_frame_then_more_frames(running: Running) -> None:
    raw = await raw_open(running)
    data = raw.ws.send(CloseConnection(1000, "bye"))
    # wsproto refuses to send after a close: hand-mask a ping the way a broken client would
    data += bytes([0x89, 0x80, 1, 2, 3, 4]) + bytes([0x81, 0x82, 0, 0, 0, 0]) + b"{}"
    await raw.send_raw(data)
    _, code = await raw.read_until_close()
    assert code in (1000, None)
    await raw.aclose()
    await still_serves(running)


# -- resets at every step of the handshake -----------------------------------------------------

HANDSHAKE_STEPS = [
    b"",
    b"GET /ws HTTP/1.1\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # no Upgrade: answered 400
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
]


@pytest.mark.parametrize("step", range(len(HANDSHAKE_STEPS)))
async def test_reset_during_handshake(running: Running, step: int) -> None:
    for _ in range(20):  # the reset races the server's answer: try it many times
        sock = socket.create_connection(("127.0.0.1", running.ports.websocket))
        if HANDSHAKE_STEPS[step]:
            sock.sendall(HANDSHAKE_STEPS[step])
        reset(sock)
    await still_serves(running)  # the daemon is still there after all of them
    with trio.fail_after(10):
        await running.daemon.gateway.wait_idle()  # and every socket was cleaned up


# -- the ingest TCP port -------------------------------------------------------------------


async def test_ingest_tcp_reset_at_once(running: Running) -> None:
    for _ in range(20):
        reset(socket.create_connection(("127.0.0.1", running.ports.ingest_tcp)))
    await still_serves(running)
    await ingest_still_serves(running)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # impossible length
        b"\x00\x00\x00\x00",  # empty frame
        b"\x00\x00\x00\x05hello",  # not MessagePack
        b"\x00\x00\x00\x01\xc1",  # the one byte MessagePack never uses
        bytes(range(256)) * 64,
    ],
)
async def test_ingest_tcp_garbage(running: Running, garbage: bytes) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
        await stream.send_all(garbage)
        await stream.send_eof()
        while await stream.receive_some(4096):
            pass
        await stream.aclose()
    assert running.daemon.intake.frames["bad"] >= 1
    await ingest_still_serves(running)


async def ingest_still_serves(running: Running) -> None:
    """A well-formed engine frame over TCP still reaches a client."""
    from ingest import wire

    async with open_client(running.ws_url) as c:
        await c.call({"op": "auth", "token": running.token("42")})
        await c.call({"op": "subscribe", "channel": "@account"})
        event = wire.AccountUpdate(uid="42", fields={"equity": "1"}, ts=1)
        envelope = wire.Envelope(src=99, epoch=1, seq=1, events=[event])
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.ingest_tcp)
        async with stream:
            await stream.send_all(wire.frame_tcp(envelope))
            got = await c.recv()
        assert got["event"] == "@account" and got["data"]["fields"] == {"equity": "1"}


async def test_a_half_sent_upgrade_ends_at_the_handshake_timeout_and_an_open_one_outlives_it(
    nursery: trio.Nursery,
) -> None:
    """The handshake timeout is the connection scope's deadline until the upgrade is answered:
    a peer that sends half a request is closed unanswered and counted; one that opened earlier
    (its own deadline long past by then) goes on, the deadline lifted when it opened."""
    running = await start_daemon(nursery, make_config(limits={"handshake_timeout_s": 0.3}))
    async with open_client(running.ws_url) as earlier:
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.websocket)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and nothing more
            with trio.fail_after(10):
                assert await stream.receive_some(65536) == b""  # closed, no answer
        assert (await earlier.call({"op": "ping"}))["op"] == "pong"
    async with httpx.AsyncClient() as api:
        metrics = (await api.get(f"{running.http_url}/metrics")).text
    counted = 'pushd_handshakes_rejected_total{reason="handshake_timeout"}'
    timed_out = [line for line in metrics.splitlines() if line.startswith(counted)]
    assert timed_out and float(timed_out[0].split()[-1]) == 1
