"""Every frame costs the sender on TLS too: the frame budget charges each read of the socket,
not each read that completed a TLS record, so a frame dribbled in tiny TCP segments pays per
segment whether or not the segments carry whole records (issue 18, review finding 7)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import make_config, start_daemon
from test_tls import Certificates
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request

from pushd.errors import CloseCode


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


class TlsPeer:
    """A WebSocket client whose TLS runs over memory buffers, so the test decides how the
    ciphertext is cut into TCP segments."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname="127.0.0.1")
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> TlsPeer:
        sock = trio.socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one send, one segment
        await sock.connect(("127.0.0.1", port))
        peer = cls(sock, context)
        with trio.fail_after(10):
            while True:
                try:
                    peer._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await peer._flush()
                    await peer._read()
            await peer.send(peer.ws.send(Request(host="localhost", target="/ws")))
            assert any(isinstance(e, AcceptConnection) for e in await peer.events())
        return peer

    async def _flush(self) -> None:
        if data := self._outgoing.read():
            await self.sock.send(data)

    async def _read(self) -> bool:
        data = await self.sock.recv(65536)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        return bool(data)

    def ciphertext(self, plaintext: bytes) -> bytes:
        self._tls.write(plaintext)
        return self._outgoing.read()

    async def send(self, plaintext: bytes) -> None:
        await self.sock.send(self.ciphertext(plaintext))

    async def events(self) -> list[object]:
        """The WebSocket events of the next read that completes any (or a close at EOF)."""
        while True:
            alive = await self._read()
            plain = b""
            try:
                while chunk := self._tls.read(65536):
                    plain += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                pass
            if plain or not alive:  # b"" would mean EOF to wsproto
                self.ws.receive_data(plain or None)
            events = list(self.ws.events())
            if events or not alive:
                return events


async def test_a_frame_in_tiny_tls_segments_pays_per_segment(
    nursery: trio.Nursery, certs: Certificates
) -> None:
    """A ping whose TLS record comes whole is answered; the first six bytes of the same
    record, one per TCP segment (each read by the server before the next is sent), break a
    budget of five: reads that completed no record are charged like reads that completed no
    frame."""
    burst = 5
    config = make_config(
        websocket=certs.tls_section(), limits={"frames_per_second": 0.01, "frame_burst": burst}
    )
    running = await start_daemon(nursery, config)
    port = running.ports.websocket
    whole = await TlsPeer.open(port, certs.client_context())
    await whole.send(whole.ws.send(Ping(b"")))
    with trio.fail_after(10):
        assert any(isinstance(e, Pong) for e in await whole.events())
    dribbled = await TlsPeer.open(port, certs.client_context())
    record = dribbled.ciphertext(dribbled.ws.send(Ping(b"")))
    assert len(record) > 2 * burst  # no segment below completes the record
    for byte in record[: burst + 1]:
        await dribbled.sock.send(bytes([byte]))
        await trio.testing.wait_all_tasks_blocked()  # the server has read it and waits again
    with trio.fail_after(5):
        closes = [e for e in await dribbled.events() if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [CloseCode.RATE_LIMITED]
    whole.sock.close()
    dribbled.sock.close()
