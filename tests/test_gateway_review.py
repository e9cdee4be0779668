"""Defects found reviewing issue 20's gateway redesign (steps 0-4), each pinned by a test that
failed on the redesign as it was handed over."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
import trio.testing
from conftest import RawClient, Running, make_config, start_daemon
from wsproto.events import AcceptConnection, CloseConnection

from pushd.daemon import Daemon

PAYLOAD = {"pad": "x" * 16_000}


def closed_by_server(running: Running, reason: str) -> float:
    value = running.daemon.registry.get_sample_value(
        "pushd_connections_closed_by_server_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_client_close_is_answered_with_its_code_and_reason(running: Running) -> None:
    """RFC 6455 5.5.1 (wsproto's ``CloseConnection.response``): the answer echoes the client's
    close frame, its reason included, as before the redesign."""
    raw = await RawClient.connect(running.ports.websocket)
    assert isinstance(await raw.handshake(), AcceptConnection)
    await raw.send_raw(raw.ws.send(CloseConnection(code=1000, reason="bye for now")))
    answer = None
    with trio.fail_after(10):
        while answer is None:
            data = await raw.stream.receive_some(65536)
            raw.ws.receive_data(data or None)
            answer = next((e for e in raw.ws.events() if isinstance(e, CloseConnection)), None)
    assert (answer.code, answer.reason) == (1000, "bye for now")
    await raw.aclose()


async def test_a_client_that_closes_while_its_socket_is_drained_ends_cleanly(
    nursery: trio.Nursery,
) -> None:
    """The read loop answers the close frame (dirty again) and cancels the connection's nursery:
    the cancelled drain must not hand the socket back to the flusher, whose next round would
    start a drain in a nursery that is closed (a 'flush failed' and closed{internal_error}).
    Which of the two tasks runs first is trio's choice: a few rounds cover both orders."""
    config = make_config(limits={"outbound_buffer_bytes": 65536, "stall_timeout_s": 60.0,
                                 "close_timeout_s": 30.0})  # fmt: skip
    running = await start_daemon(nursery, config)
    gateway = running.daemon.gateway
    for _ in range(8):
        raw = await RawClient.connect(running.ports.websocket, rcvbuf=4096)
        assert isinstance(await raw.handshake(), AcceptConnection)
        await raw.send_json({"op": "subscribe", "channel": "BTCUSDT@trades"})
        (conn,) = gateway.connections
        with trio.fail_after(20):
            while not conn.draining:  # the kernel's buffers fill: a drain waits for the reader
                await running.publish_batch([{"channel": "trades_BTCUSDT", "data": PAYLOAD}] * 8)
        await raw.send_raw(raw.ws.send(CloseConnection(code=1000)))
        with trio.fail_after(20):
            await gateway.wait_idle()
        await raw.aclose()
        assert closed_by_server(running, "internal_error") == 0


class FailingListener:
    """A listener that is always readable and whose every accept fails with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.attempts = 0
        self._ours, self._theirs = socket.socketpair()
        self._theirs.send(b"x")  # readable from now on

    def fileno(self) -> int:
        return self._ours.fileno()

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        self.attempts += 1
        if self.attempts > 50:
            raise Spun(self.attempts)
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


class Spun(Exception):
    """The accept loop retried without pausing."""


async def test_an_accept_error_that_persists_pauses_the_loop(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Not only EMFILE: any accept error that stays (the listener readable) is retried after a
    pause, not in a busy loop that floods the log and starves every connection."""
    gateway = Daemon(make_config()).gateway
    listener = FailingListener(errno.EINVAL)
    with trio.move_on_after(1.0):
        await gateway._accept_loop(listener, nursery)  # type: ignore[arg-type]
    listener.close()
    assert 5 <= listener.attempts <= 11


async def test_a_listener_closed_under_the_gateway_ends_it_loudly(nursery: trio.Nursery) -> None:
    """EBADF/ENOTSOCK (trio's closed class) is a bug, not a peer: as trio's serve_listeners
    does, it raises, rather than leaving a node that looks ready and accepts nobody."""
    gateway = Daemon(make_config()).gateway
    listener = FailingListener(errno.EBADF)
    with pytest.raises(trio.ClosedResourceError):
        await gateway._accept_loop(listener, nursery)  # type: ignore[arg-type]
    listener.close()


async def test_a_state_bug_at_a_connections_end_costs_that_connection_only(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bookkeeping bug when a connection ends (a phase move its table forbids) must still
    close that socket and free its per-IP slot, and never reach the gateway's nursery: the next
    client is served."""
    from pushd.errors import LocalStateError
    from pushd.gateway.lifecycle import Lifecycle

    def broken(self: Lifecycle) -> None:
        raise LocalStateError("a move the table forbids")

    gateway = running.daemon.gateway
    with monkeypatch.context() as patch:
        patch.setattr(Lifecycle, "closed", broken)
        raw = await RawClient.connect(running.ports.websocket)
        assert isinstance(await raw.handshake(), AcceptConnection)
        await raw.send_raw(raw.ws.send(CloseConnection(code=1000)))
        with trio.fail_after(10):
            while await raw.stream.receive_some(65536):  # the socket is closed: EOF
                pass
            await gateway.wait_idle()
        await raw.aclose()
    assert not gateway.connections and gateway.open_sockets == 0
    after = await RawClient.connect(running.ports.websocket)  # the gateway still serves
    assert isinstance(await after.handshake(), AcceptConnection)
    await after.aclose()
