"""One client connection: its socket, the bytes that go in and out of it, and its lifecycle.

Sockets are plain non-blocking stdlib sockets waited on with ``trio.lowlevel``; nothing else
touches them, so no lock is needed anywhere on the fan-out path. Each has a small configured
``SO_SNDBUF``, so a client that stops reading holds at most its outbound buffer plus that.

Outbound, frames wait in the hub's outlet (``out``, bounded); what is on its way to the
kernel waits in one *wire* buffer: with TLS the records made of those frames (made once the
previous ones are all written, so the plaintext keeps counting against the outlet's limit
while the socket is full); without TLS the outlet's frames are the wire. ``write_some`` is the
one non-blocking write (the flusher's and the drain's), ``send_now`` the shell's blocking one
(handshake answers, the last close frame); each asserts who writes (``Lifecycle.writer``).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import socket
import ssl
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState
from wsproto.events import Pong, Request

from pushd.errors import PeerGone, TlsClosed
from pushd.gateway.admission import Refusal, malformed
from pushd.gateway.hub import Hub, Outlet, frame_end
from pushd.gateway.lifecycle import Lifecycle, Phase, Writer
from pushd.gateway.ratelimit import FrameBudget
from pushd.gateway.session import Session
from pushd.gateway.upgrade import Upgrade
from pushd.tls import TlsLayer

if TYPE_CHECKING:
    from pushd.gateway.requests import TokenWatch

RECV_BYTES = 65536


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the kernel's send queue not yet taken by the peer (SIOCOUTQ)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return buf[0]


class Traffic:
    """What a gateway's sockets have written, all connections together."""

    __slots__ = ("bytes_sent",)

    def __init__(self) -> None:
        self.bytes_sent = 0


class Connection:
    """One client: its socket, its wsproto state, its Session, and its outlet in the hub."""

    __slots__ = (
        "conn_id",
        "frames",
        "gone_reason",
        "hub",
        "ip",
        "leave",
        "life",
        "nursery",
        "outlet",
        "peer",
        "pong_at",
        "pong_due",
        "pongs_owed",
        "session",
        "sock",
        "target",
        "tls",
        "token_watch",
        "traffic",
        "wire",
        "ws",
    )

    def __init__(
        self, sock: socket.socket, ip: str, peer: str, conn_id: int, limit: int,
        hub: Hub, traffic: Traffic,
    ) -> None:  # fmt: skip
        self.outlet = Outlet(limit, self)
        self.sock = sock
        self.ip = ip
        self.peer = peer
        self.conn_id = conn_id
        self.hub = hub
        self.traffic = traffic
        self.life = Lifecycle()
        self.gone_reason = "client went away"  # why, if it just goes (a broken TLS record)
        self.wire = bytearray()  # TLS records not yet written
        self.ws: WsConnection | None = None
        self.session: Session | None = None
        self.target = "/"  # the request target of its upgrade (path and query)
        self.leave: Callable[[], None] | None = None  # another dialect's own leave_all
        self.nursery: trio.Nursery | None = None  # its task's; its cancel scope is ``scope``
        self.tls: TlsLayer | None = None
        self.frames: FrameBudget | None = None  # what its received frames may cost (once open)
        self.pongs_owed = 0  # pongs queued since its outbound buffer was last empty
        self.pong_due: bytes | None = None  # the latest ping, when past the pongs owed
        self.pong_at = 0.0  # when the client's last pong came (trio time; 0: none yet)
        self.token_watch: TokenWatch | None = None  # its login's next token check, if any

    @property
    def unsent(self) -> bool:
        """Bytes wait to be written: frames, or TLS records made of them."""
        return bool(self.outlet.out) or bool(self.wire)

    @property
    def phase(self) -> Phase:
        return self.life.phase

    @property
    def closing(self) -> bool:
        return self.life.closing

    @property
    def draining(self) -> bool:
        return self.life.writer is Writer.DRAIN

    @property
    def scope(self) -> trio.CancelScope | None:
        """The connection's one cancel scope (its nursery's): the handshake timeout, an
        abort, the close timeout."""
        nursery = self.nursery
        return None if nursery is None else nursery.cancel_scope

    @property
    def leaving(self) -> bool:
        """Its task is leaving its nursery (ended, aborted, past the close timeout, or failed):
        no drain may start there any more, and the task writes the last bytes itself."""
        nursery = self.nursery
        return nursery is None or nursery.cancel_scope.cancel_called

    @property
    def close_reason(self) -> str:
        """Why it ended (its Disconnect's reason), once it has."""
        ending = self.life.ending
        return self.gone_reason if ending is None else ending.reason

    @property
    def uid(self) -> str | None:
        return self.session.uid if self.session is not None else None

    # -- frames out --------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame through the hub (raises unless open: nothing after the close frame)."""
        self.life.check_write()
        self.hub.send(self.outlet, frame)

    def leave_all(self) -> None:
        """Leave every channel: no more events."""
        if self.session is not None:
            for internal in self.session.unsubscribe_all():
                self.hub.unsubscribe(self.outlet, internal)
        if self.leave is not None:
            self.leave()

    def answer_ping(self, payload: bytes, max_owed: int) -> None:
        """A pong for each ping while at most ``max_owed`` wait to be written; past that, only
        the latest ping is answered, once the others are out (RFC 6455 5.5.3 allows it): a
        client that pings and does not read costs a few pongs, not a buffer."""
        ws = self.ws
        if self.phase is not Phase.OPEN or ws is None or ws.state is not ConnectionState.OPEN:
            return  # closing: RFC 6455 lets us leave it unanswered; the close frame is sent
        if not self.unsent:
            self.pongs_owed = 0
        if self.pongs_owed < max_owed:
            self.pongs_owed += 1
            self.pong_due = None  # this one is the latest
            self.send(ws.send(Pong(payload)))
        else:
            self.pong_due = bytes(payload)

    def written(self) -> None:
        """All that was queued is written: no pong is owed any more (the latest ping past the
        cap gets its pong now), and each lagging channel resumes. Nothing to do unless pongs
        are owed (``pong_due`` implies it) or the outlet is behind: the flusher tests that
        first."""
        self.pongs_owed = 0
        if self.pong_due is not None:
            payload, self.pong_due = self.pong_due, None
            ws = self.ws
            if self.phase is Phase.OPEN and ws is not None and ws.state is ConnectionState.OPEN:
                self.pongs_owed = 1
                self.send(ws.send(Pong(payload)))
        outlet = self.outlet
        if outlet.lagging or outlet.replaying:  # (``outlet.behind``: once per round, no property)
            self.hub.drained(outlet)

    def discard(self) -> None:
        """Drop everything unsent (an abort: nothing more is written)."""
        self.outlet.out.clear()
        self.outlet.head_left = 0
        self.wire.clear()

    # -- writing -----------------------------------------------------------------------------

    def write_some(self, writer: Writer) -> None:
        """One non-blocking send of what waits (the flusher's or the drain's). Raises PeerGone
        when the peer reset the connection.

        The flusher calls it once per dirty connection per round, so it is written flat: one
        call, the ``send`` inline, the writer's check one comparison."""
        life = self.life
        if life.writer is not writer:
            life.check_writer(writer)  # raises: a bug
        outlet = self.outlet
        out = outlet.out
        wire = self.wire
        if self.tls is not None:
            if not wire:
                wire += self.tls.send(out)
                out.clear()
                outlet.head_left = 0
            data = wire
        else:
            data = out
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return
        except OSError:
            raise PeerGone from None
        self.traffic.bytes_sent += sent
        if data is wire:
            del wire[:sent]
        elif sent == len(out):
            out.clear()
            outlet.head_left = 0
        elif sent > 0:
            outlet.head_left = frame_end(out, outlet.head_left, sent) - sent
            del out[:sent]

    def _ciphertext(self, data: bytes | bytearray) -> bytes:
        """What goes on the wire for ``data``: itself, or with TLS every record still unsent
        and then ``data`` encrypted."""
        if self.tls is None:
            return bytes(data)
        wire = bytes(self.wire) + self.tls.send(data)
        self.wire.clear()
        return wire

    async def send_now(self, data: bytes) -> bool:
        """Write while nothing else writes this socket (handshake answers, the last close
        frame); False if the peer is gone."""
        self.life.check_writer(Writer.SHELL)
        return await self._send_all(self._ciphertext(data))

    def last_words(self) -> None:
        """Whatever is unsent (a last close frame), if the kernel takes it now."""
        self.life.check_writer(Writer.SHELL)
        if self.unsent:
            with contextlib.suppress(OSError):
                self.sock.send(self._ciphertext(self.outlet.out))

    async def _send_all(self, data: bytes) -> bool:
        """Sent before any wait, as trio's sockets do: a socket that takes the bytes (a fresh
        one always does) costs no epoll registration and no trip through the scheduler."""
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError:
                return False
            self.traffic.bytes_sent += sent
            view = view[sent:]
        return True

    # -- reading -----------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """Next bytes from the peer (decrypted); b"" when it closed or reset the connection."""
        while (data := await self.recv_read()) == b"":
            pass  # a TLS read that completed no record
        return data or b""

    async def recv_read(self) -> bytes | None:
        """The plaintext of one read of the socket: b"" when it completed no TLS record (the
        frame budget charges it like a read that completed no frame), None when the peer
        closed or reset the connection."""
        tls = self.tls
        if tls is None:
            return await self._recv_raw() or None
        try:
            data = tls.receive(b"")  # what came with the records already read
            if data:
                return data
            raw = await self._recv_raw()
            if not raw:
                return None
            return tls.receive(raw)
        except TlsClosed as exc:
            self.gone_reason = str(exc)
            return None

    async def _recv_raw(self) -> bytes:
        """Read before any wait, as trio's sockets do: bytes already there (an upgrade request
        by the time it is accepted) cost no epoll registration. A read that did not wait
        yields once after it, so a peer that floods never holds the loop."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                waited = True
                continue
            except OSError:
                data = b""
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def read_request(
        self, upgrade: Upgrade, tls: ssl.SSLContext | None
    ) -> Request | Refusal | None:
        """TLS first on wss://, then the upgrade request; a Refusal for a request h11 or
        wsproto cannot take (``admission.malformed``), None if the peer went away. Raises
        TlsClosed when its TLS is broken."""
        if tls is not None and not await self._tls_handshake(tls):
            return None
        try:
            while True:
                data = await self.recv()
                if not data:
                    return None
                if (request := upgrade.receive(data)) is not None:
                    return request
        except Exception as exc:  # h11/wsproto found the request malformed
            return malformed(exc)

    async def _tls_handshake(self, context: ssl.SSLContext) -> bool:
        """TLS first, on wss://; False if the peer went away while answered. Raises TlsClosed
        when its TLS is broken or it left mid-handshake (the alert, if any, is sent)."""
        tls = TlsLayer(context)
        data = b""
        try:
            while not tls.handshake(data):
                if (answer := tls.pending()) and not await self._send_all(answer):
                    return False
                if not (data := await self._recv_raw()):
                    raise TlsClosed("peer left during the TLS handshake")
        except TlsClosed:
            await self._send_all(tls.pending())
            raise
        self.tls = tls
        return await self._send_all(tls.pending())
