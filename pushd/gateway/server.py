"""The WebSocket gateway: Trio shell around wsproto, Session and Hub.

Theory of operation
-------------------
A connection lives through four phases (``lifecycle``: the legal moves are listed there, and a
frame queued in a wrong phase raises)::

    HANDSHAKE --accept--> OPEN --end(Disconnect)--> CLOSING --socket closed--> CLOSED
        \\----refuse (HTTP answer) or peer gone--------------------------------/

It ends one way: ``Gateway.end`` with a ``Disconnect`` value (slow consumer, going away, the
client's close, ...). That is the only code that moves a connection out of OPEN: it
unsubscribes, queues the close frame through the hub's dirty path like every other write (or,
for an abort, ends the socket now), and counts ``closed{label}`` and the close code.

Per connection there is one task, which reads: it feeds bytes to wsproto, charges every frame
to the connection's ``FrameBudget`` (any opcode; a breach closes it), hands requests to the
Session, and queues replies through the Hub. Writing has exactly one owner at a time:

- the gateway's single *flusher* task writes every dirty outlet with one non-blocking ``send``
  after the publishers of a scheduler tick have run (frames of one tick coalesce into one
  syscall per connection); it yields every ``FLUSH_SLICE_S`` so a round over thousands of
  connections never stalls the loop;
- if the kernel buffer is full, the rest is left to a *drain* task started in that connection's
  nursery, which waits until the socket is writable; the flusher skips the connection meanwhile.
  Who writes now is one field (``Lifecycle.writer``: shell, flusher or drain), asserted by
  every write.
  A drain that sees no byte leave the kernel's send queue for ``stall_timeout_s`` ends the
  connection (slow consumer).

Whatever one peer causes ends that peer only: the connection task is an error boundary (log
line, metric, close 1011 where a close can still be sent), and so is each write of the flusher.
Only a failure of the gateway itself (cannot bind its port) ends the process.

Sockets are plain non-blocking stdlib sockets waited on with ``trio.lowlevel``; nothing else
touches them, so no lock is needed anywhere on the fan-out path. Each has a small configured
``SO_SNDBUF``, so a client that stops reading holds at most its outbound buffer plus that.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import socket
import termios
import time
from typing import Any
from urllib.parse import urlsplit

import structlog
import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake

from pushd.auth import Verifier
from pushd.bus.model import Bus, BusUnavailable, Position, Recovery
from pushd.channels import Channel
from pushd.config import Config
from pushd.errors import AuthError, AuthUnavailable, ErrorCode, RequestError
from pushd.gateway import lifecycle, protocol
from pushd.gateway.hub import Hub, Outlet, frame_end, text_frame
from pushd.gateway.lifecycle import Disconnect, Lifecycle, Phase, Writer
from pushd.gateway.ratelimit import Breach, FrameBudget, TokenBucket
from pushd.gateway.session import Session, TokenExpired, TokenNotice
from pushd.metrics import GatewayMetrics
from pushd.tls import TlsClosed, TlsLayer, server_context

RECV_BYTES = 65536
ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_PAUSE_S = 0.1
FLUSH_SLICE_S = 0.002  # the flusher yields after this much work in one round
STALL_POLL_S = 0.5  # how often a drain looks at the kernel's send queue while not writable
PER_IP_FLOOD = 16  # sockets over max_connections_per_ip that are still answered (429)
BREACH_CLOSE = {  # how a connection that breaks its frame budget is closed
    Breach.FRAME_RATE: lifecycle.TOO_MANY_FRAMES,
    Breach.FRAGMENTS: lifecycle.TOO_MANY_FRAGMENTS,
    Breach.MESSAGE_TIMEOUT: lifecycle.MESSAGE_TIMEOUT,
}

HANDSHAKE_CLOSE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)  # a close can be sent
log = structlog.get_logger("pushd.gateway.server")


class Connection(Outlet):
    """One client: its socket, its wsproto state, its Session, and its place in the hub."""

    __slots__ = (
        "conn_id",
        "frames",
        "gone_reason",
        "ip",
        "life",
        "nursery",
        "peer",
        "pong_due",
        "pongs_owed",
        "scope",
        "session",
        "sock",
        "tls",
        "token_wait",
        "ws",
    )

    def __init__(self, sock: socket.socket, ip: str, peer: str, conn_id: int, limit: int) -> None:
        super().__init__(limit)
        self.sock = sock
        self.ip = ip
        self.peer = peer
        self.conn_id = conn_id
        self.life = Lifecycle()
        self.gone_reason = "client went away"  # the log's reason when no Disconnect ended it
        self.ws: WsConnection | None = None
        self.session: Session | None = None
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.tls: TlsLayer | None = None
        self.frames: FrameBudget | None = None  # what its received frames may cost (once open)
        self.pongs_owed = 0  # pongs queued since its outbound buffer was last empty
        self.pong_due: bytes | None = None  # the latest ping, when past the pongs owed
        self.token_wait: trio.CancelScope | None = None  # the token timer's sleep, if running

    @property
    def unsent(self) -> bool:
        """Bytes wait to be written: frames, or TLS records made of them."""
        return bool(self.out) or (self.tls is not None and bool(self.tls.unsent))

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
    def close_reason(self) -> str:
        ending = self.life.ending
        return self.gone_reason if ending is None else ending.reason


def linger_s(coalesce_ms: float, now: float, last_end: float, last_round: float) -> float:
    """How long a flush round waits before it starts. When the last round was expensive (it
    took ``coalesce_ms`` or more: a big fan-out) and frames are wanted out again before the
    loop has been idle that long, publishers keep it busy (one message per publish call, say):
    waiting half a round, at most ``coalesce_ms``, lets several of their frames share each
    connection's one send, which is most of a round's cost (BENCHMARKS.md, issue 11). An idle
    loop, or cheap rounds (the market mix), flush at once."""
    limit_s = coalesce_ms / 1000
    if limit_s and last_round >= limit_s and now - last_end < last_round:
        return min(limit_s, last_round / 2)
    return 0.0


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the kernel's send queue not yet taken by the peer (SIOCOUTQ)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return buf[0]


class Gateway:
    def __init__(
        self, config: Config, hub: Hub, bus: Bus, verifier: Verifier, metrics: GatewayMetrics
    ) -> None:
        self._config = config
        self._bus = bus
        self._limits = config.limits
        self._symbols = frozenset(config.markets)
        self.hub = hub
        self._verifier = verifier
        self._metrics = metrics
        self.connections: set[Connection] = set()
        self._by_uid: dict[str, set[Connection]] = {}
        self._per_ip: dict[str, int] = {}
        ws_cfg = config.websocket
        self._handshakes = TokenBucket(
            ws_cfg.handshakes_per_second, max(1, int(ws_cfg.handshakes_per_second)), 0.0
        )
        self.open_sockets = 0
        self._ids = itertools.count(1)
        self.tls_context = server_context(ws_cfg.tls, "websocket")
        self._flush_wanted = trio.Event()
        self._all_closed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        self.stopping = False
        self.flush_stall_max_s = 0.0  # the longest the flusher ran without yielding
        self.flush_round_max_s = 0.0  # the longest round's writing time (all its slices)
        self.bytes_sent = 0
        self._dirty_since = 0.0  # when the first frame of the next flush round was queued
        hub.on_dirty = self._flush_wanted_set

    def reconfigure(self, config: Config, verifier: Verifier) -> None:
        """A reload: new admission rules, limits and logins for what comes next; open
        connections keep their buffers and get the new request limits."""
        self._config = config
        self._limits = config.limits
        self._verifier = verifier
        ws_cfg = config.websocket
        self._handshakes.retune(
            ws_cfg.handshakes_per_second, max(1, int(ws_cfg.handshakes_per_second))
        )
        for conn in self.connections:
            if conn.session is not None:
                conn.session.relimit(config.limits)
            if conn.frames is not None:
                conn.frames.retune(config.limits)

    def _flush_wanted_set(self) -> None:
        self._dirty_since = time.perf_counter()
        self._flush_wanted.set()

    def connection_states(self) -> dict[str, int]:
        """Sockets by phase: handshakes in progress, open, closing."""
        closing = sum(1 for conn in self.connections if conn.phase is not Phase.OPEN)
        return {
            Phase.HANDSHAKE.value: self.open_sockets - len(self.connections),
            Phase.OPEN.value: len(self.connections) - closing,
            Phase.CLOSING.value: closing,
        }

    # -- serving ---------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """The listening socket. Raises OSError (port in use, ...)."""
        ws_cfg = self._config.websocket
        listener = socket.create_server(
            (ws_cfg.host, ws_cfg.port), backlog=ws_cfg.backlog, reuse_port=ws_cfg.reuse_port
        )
        listener.setblocking(False)
        return listener

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; reports the bound port through ``task_status``
        (OSError before that: the port cannot be bound). On ``shutdown`` the listener is closed
        first (new connects are refused at once), then the connections finish here."""
        listener = self.bind()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher)
            with listener, trio.CancelScope() as self._accepting:
                task_status.started(listener.getsockname()[1])
                await self._accept_loop(listener, nursery)

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in ACCEPT_ERRNOS:
                        log.warning("accept failed", error=exc.strerror)
                        break
                    log.error("accept failed", error=exc.strerror, open_sockets=self.open_sockets)
                    await trio.sleep(ACCEPT_PAUSE_S)
                    break
                ip = str(addr[0])
                ws_cfg = self._config.websocket  # the current limits: a reload changes them
                max_sockets = ws_cfg.max_connections + 64
                per_ip_cut = ws_cfg.max_connections_per_ip + PER_IP_FLOOD
                if self.open_sockets >= max_sockets or self._per_ip.get(ip, 0) >= per_ip_cut:
                    sock.close()  # far past a limit: not even a handshake
                    reason = "capacity" if self.open_sockets >= max_sockets else "per_ip_flood"
                    self._metrics.rejected.labels(reason=reason).inc()
                    continue
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if self._limits.socket_send_buffer_bytes:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_SNDBUF,
                            self._limits.socket_send_buffer_bytes,
                        )  # fmt: skip
                except OSError:  # reset between accept and here
                    sock.close()
                    continue
                self.open_sockets += 1
                self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
                nursery.start_soon(self._handle, sock, ip, f"{ip}:{addr[1]}")

    async def shutdown(self, grace_s: float) -> None:
        """Close the listener; close every client with 1001 (handshakes in flight get 503) and
        wait up to ``grace_s`` for them."""
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for conn in list(self.connections):
            self.end(conn, lifecycle.GOING_AWAY)
        with trio.move_on_after(grace_s):
            await self.wait_idle()

    async def wait_idle(self) -> None:
        """Return once no socket is open (at once if none is)."""
        if self.open_sockets:
            await self._all_closed.wait()

    def kick(self, uid: str) -> int:
        """Close every connection logged in as ``uid`` (operator's request); returns how many."""
        conns = list(self._by_uid.get(uid, ()))
        for conn in conns:
            self.end(conn, lifecycle.KICKED)
        return len(conns)

    # -- writing ---------------------------------------------------------------------------

    async def _flusher(self) -> None:
        hub = self.hub
        clock = time.perf_counter
        last_round = 0.0  # how long the last round took, and when it ended
        last_end = 0.0
        while True:
            await self._flush_wanted.wait()
            if wait_s := linger_s(self._limits.coalesce_ms, clock(), last_end, last_round):
                await trio.sleep(wait_s)  # the publishers run freely meanwhile
            self._flush_wanted = trio.Event()
            dirty, hub.dirty = hub.dirty, []
            started = clock()
            self._metrics.publish_to_flush.observe(started - self._dirty_since)
            work = 0.0  # this round's time spent writing: what one unbroken round would block
            for n, outlet in enumerate(dirty, 1):
                conn: Connection = outlet  # type: ignore[assignment]  # gateway outlets are Connections
                try:
                    self._flush(conn)
                except Exception:  # one connection's failure is that connection's only
                    log.exception("flush failed", conn_id=conn.conn_id, peer=conn.peer)
                    self._fail(conn)
                if not n % 64 and (elapsed := clock() - started) > FLUSH_SLICE_S:
                    self.flush_stall_max_s = max(self.flush_stall_max_s, elapsed)
                    work += elapsed
                    await trio.lowlevel.checkpoint()
                    started = clock()
            elapsed = clock() - started
            self.flush_stall_max_s = max(self.flush_stall_max_s, elapsed)
            self.flush_round_max_s = max(self.flush_round_max_s, work + elapsed)
            self._metrics.flush_seconds.observe(work + elapsed)
            last_round, last_end = work + elapsed, clock()

    def _flush(self, conn: Connection) -> None:
        if conn.slow and conn.phase is Phase.OPEN:
            self.end(conn, lifecycle.SLOW_CONSUMER)
            return
        if conn.life.writer is not Writer.FLUSHER or not conn.out:
            return
        if not self._write(conn, Writer.FLUSHER):
            return
        if conn.unsent:
            assert conn.nursery is not None
            conn.life.hand_to(Writer.DRAIN)
            conn.nursery.start_soon(self._drain, conn)
        else:
            self._written(conn)

    def _write(self, conn: Connection, writer: Writer) -> bool:
        """One non-blocking send of the outbound buffer; False if the peer is gone."""
        conn.life.check_writer(writer)
        if conn.tls is not None:
            return self._write_tls(conn, conn.tls)
        out = conn.out
        sent = self._send(conn, out)
        if sent == len(out):
            out.clear()
            conn.head_left = 0
        elif sent > 0:
            conn.head_left = frame_end(out, conn.head_left, sent) - sent
            del out[:sent]
        return sent >= 0

    def _write_tls(self, conn: Connection, tls: TlsLayer) -> bool:
        """The queued frames become records once the previous ones are all written, so the
        plaintext queue keeps counting against the outbound limit while the socket is full."""
        wire = tls.unsent
        if not wire:
            wire += tls.send(conn.out)
            conn.out.clear()
            conn.head_left = 0
        sent = self._send(conn, wire)
        if sent > 0:
            del wire[:sent]
        return sent >= 0

    def _send(self, conn: Connection, data: bytearray) -> int:
        """Bytes the kernel took now (0: its buffer is full); -1: the peer is gone, and the
        connection is aborted."""
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.end(conn, lifecycle.RESET)
            return -1
        self.bytes_sent += sent
        return sent

    async def _drain(self, conn: Connection) -> None:
        stall_s = self._limits.stall_timeout_s
        try:
            queued = unsent_bytes(conn.sock)
            deadline = trio.current_time() + stall_s
            while conn.unsent:
                with trio.move_on_after(STALL_POLL_S) as polled:
                    await trio.lowlevel.wait_writable(conn.sock)
                if polled.cancelled_caught:  # not writable yet: is the peer taking any bytes?
                    now_queued = unsent_bytes(conn.sock)
                    if now_queued < queued:
                        deadline = trio.current_time() + stall_s
                    queued = now_queued
                    if trio.current_time() >= deadline:
                        self.end(conn, lifecycle.STALLED)
                        return
                    continue
                if not self._write(conn, Writer.DRAIN):
                    return
                queued = unsent_bytes(conn.sock)
                deadline = trio.current_time() + stall_s
        except OSError:  # the socket went away under the ioctl
            self.end(conn, lifecycle.RESET)
            return
        finally:
            if conn.life.writer is Writer.DRAIN:  # (the shell took over if its task ended)
                conn.life.hand_to(Writer.FLUSHER)
        if conn.slow:
            self._flush(conn)
        else:
            self._written(conn)

    def _written(self, conn: Connection) -> None:
        """All that was queued is written: no pong is owed any more (the latest ping past the
        cap gets its pong now), and each lagging channel resumes."""
        conn.pongs_owed = 0
        if conn.pong_due is not None:
            payload, conn.pong_due = conn.pong_due, None
            ws = conn.ws
            if conn.phase is Phase.OPEN and ws is not None and ws.state is ConnectionState.OPEN:
                conn.pongs_owed = 1
                self._queue(conn, ws.send(Pong(payload)))
        if conn.behind:
            self.hub.drained(conn)

    def _send_ws(self, conn: Connection, payload: bytes) -> None:
        self._queue(conn, text_frame(payload))

    def _queue(self, conn: Connection, frame: bytes) -> None:
        """Queue a frame to an open connection (raises in any other phase)."""
        conn.life.check_write()
        self.hub.send(conn, frame)

    def end(self, conn: Connection, disconnect: Disconnect) -> None:
        """End a connection: the only code that moves it out of OPEN.

        It leaves every channel at once (no more events). A close handshake: frames still
        queued are dropped (whole frames only) and the close frame follows through the hub's
        dirty path, so it is the next thing the client reads -- it is told why at once, not
        after a backlog it cannot use; the socket has ``close_timeout_s`` to finish. An abort
        (``disconnect.abort``: the peer is gone, or takes no byte) ends the socket now, even
        one that was closing already. A connection ending already keeps its first reason."""
        first = conn.life.end(disconnect)
        if not first and not disconnect.abort:
            return
        if disconnect.label is not None:
            self._metrics.closed.labels(reason=disconnect.label).inc()
        self._unsubscribe_all(conn)
        ws = conn.ws
        if disconnect.abort or ws is None or ws.state not in HANDSHAKE_CLOSE:
            del conn.out[:]
            conn.head_left = 0
            if conn.tls is not None:
                conn.tls.unsent.clear()
            if conn.scope is not None:
                conn.scope.cancel()
            return
        self._metrics.close_code(disconnect.by, int(disconnect.code))
        del conn.out[conn.head_left :]
        if disconnect.by == "client":  # the answer to its close frame: its code
            conn.out += ws.send(CloseConnection(code=disconnect.code))
        else:
            conn.out += ws.send(CloseConnection(code=disconnect.code, reason=disconnect.reason))
        conn.slow = False
        self.hub.mark_dirty(conn)  # the one path that stamps the round's first frame
        if conn.scope is not None:
            conn.scope.deadline = min(
                conn.scope.deadline, trio.current_time() + self._limits.close_timeout_s
            )

    def _fail(self, conn: Connection) -> None:
        """This connection hit a bug or an impossible state: 1011 if a close can still be sent,
        then the socket closes. Nobody else is touched."""
        self.end(conn, lifecycle.INTERNAL_ERROR if conn.phase is Phase.OPEN else lifecycle.BROKEN)

    def _unsubscribe_all(self, conn: Connection) -> None:
        if conn.session is not None:
            for internal in conn.session.subscriptions:
                self.hub.unsubscribe(conn, internal)
            conn.session.subscriptions.clear()

    # -- one connection ----------------------------------------------------------------------

    async def _handle(self, sock: socket.socket, ip: str, peer: str) -> None:
        conn = Connection(sock, ip, peer, next(self._ids), self._limits.outbound_buffer_bytes)
        bound = log.bind(conn_id=conn.conn_id, peer=peer)
        try:
            with trio.CancelScope() as conn.scope:
                try:
                    async with trio.open_nursery() as conn.nursery:
                        if await self._handshake(conn):
                            await self._serve_open(conn, bound)
                        conn.nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:  # the error boundary: this peer ends only
                    self._shell_writes(conn)
                    errors, cancelled = group.split(Exception)
                    if errors is not None:
                        bound.error("connection failed", exc_info=errors)
                        self._fail(conn)
                    if cancelled is not None:
                        raise cancelled from None
                    if conn.unsent:  # the 1011 close frame
                        with trio.move_on_after(self._limits.close_timeout_s):
                            await self._send_now(conn, bytes(conn.out))
                        conn.out.clear()
        finally:
            self._shell_writes(conn)
            self._forget(conn)
            if conn.unsent:  # a last close frame, if the kernel takes it now
                with contextlib.suppress(OSError):
                    sock.send(self._ciphertext(conn, conn.out))
            conn.life.closed()
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._release_socket(ip)
            if conn.ws is not None:
                bound.info("connection closed", reason=conn.close_reason, uid=self._uid_of(conn))

    async def _serve_open(self, conn: Connection, bound: Any) -> None:
        self.connections.add(conn)
        self._metrics.opened.inc()
        bound.info("connection open")
        if self.stopping:  # shutdown began while this handshake was answered
            self.end(conn, lifecycle.GOING_AWAY)
        await self._read_loop(conn)

    @staticmethod
    def _shell_writes(conn: Connection) -> None:
        """The connection's task has left its nursery (no drain runs): it is the socket's only
        writer from here."""
        if conn.life.writer is not Writer.SHELL:
            conn.life.hand_to(Writer.SHELL)

    def _release_socket(self, ip: str) -> None:
        self.open_sockets -= 1
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]
        if not self.open_sockets:
            self._all_closed.set()
            self._all_closed = trio.Event()

    @staticmethod
    def _uid_of(conn: Connection) -> str | None:
        return conn.session.uid if conn.session is not None else None

    def _forget(self, conn: Connection) -> None:
        self._unsubscribe_all(conn)
        if conn in self.connections:
            self.connections.discard(conn)
            self._metrics.closed_total.inc()
            uid = self._uid_of(conn)
            if uid is not None:
                self._leave_uid(conn, uid)

    def _leave_uid(self, conn: Connection, uid: str) -> None:
        peers = self._by_uid.get(uid)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_uid[uid]

    async def _recv(self, conn: Connection) -> bytes:
        """Next bytes from the peer (decrypted); b"" when it closed or reset the connection."""
        while (data := await self._recv_read(conn)) == b"":
            pass  # a TLS read that completed no record
        return data or b""

    async def _recv_read(self, conn: Connection) -> bytes | None:
        """The plaintext of one read of the socket: b"" when it completed no TLS record (the
        frame budget charges it like a read that completed no frame), None when the peer
        closed or reset the connection."""
        tls = conn.tls
        if tls is None:
            return await self._recv_raw(conn) or None
        try:
            data = tls.receive(b"")  # what came with the records already read
            if data:
                return data
            raw = await self._recv_raw(conn)
            if not raw:
                return None
            return tls.receive(raw)
        except TlsClosed as exc:
            conn.gone_reason = str(exc)
            return None

    async def _recv_raw(self, conn: Connection) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(conn.sock)
            try:
                return conn.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    @staticmethod
    def _ciphertext(conn: Connection, data: bytes | bytearray) -> bytes:
        """What goes on the wire for ``data``: itself, or with TLS every record still unsent
        and then ``data`` encrypted."""
        if conn.tls is None:
            return bytes(data)
        wire = bytes(conn.tls.unsent) + conn.tls.send(data)
        conn.tls.unsent.clear()
        return wire

    async def _send_now(self, conn: Connection, data: bytes) -> bool:
        """Write while nothing else writes this socket (handshake answers, the last close
        frame); False if the peer is gone."""
        conn.life.check_writer(Writer.SHELL)
        return await self._send_raw(conn, self._ciphertext(conn, data))

    async def _send_raw(self, conn: Connection, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(conn.sock)
            try:
                sent = conn.sock.send(view)
            except BlockingIOError:
                continue
            except OSError:
                return False
            self.bytes_sent += sent
            view = view[sent:]
        return True

    async def _handshake(self, conn: Connection) -> bool:
        """Read the upgrade request and answer it; True once the WebSocket is open."""
        handshake = H11Handshake(ConnectionType.SERVER)
        refusal: tuple[int, str, str] | None = None
        request: Request | None = None
        with trio.move_on_after(self._limits.handshake_timeout_s):
            if self.tls_context is not None and not await self._tls_handshake(conn):
                return False
            try:
                while request is None:
                    data = await self._recv(conn)
                    if not data:
                        return False
                    handshake.receive_data(data)
                    for event in handshake.events():
                        if isinstance(event, Request):
                            request = event
                            break
            except Exception as exc:  # h11/wsproto found the request malformed
                refusal = (400, "bad_handshake", f"bad WebSocket handshake: {exc}"[:200])
        if request is None and refusal is None:
            self._metrics.rejected.labels(reason="handshake_timeout").inc()
            return False
        if request is not None:
            refusal = self._refusal(conn, request)
        if refusal is not None:
            status, reason, text = refusal
            self._metrics.rejected.labels(reason=reason).inc()
            await self._reject(conn, handshake, status, text)
            return False
        if not await self._send_now(conn, handshake.send(AcceptConnection())):
            return False
        conn.ws = handshake.connection
        conn.session = Session(self._symbols, self._limits, trio.current_time())
        conn.life.opened()
        return conn.ws is not None

    async def _tls_handshake(self, conn: Connection) -> bool:
        """TLS first, on wss://; False (counted) if the peer is gone or its TLS is broken."""
        assert self.tls_context is not None
        tls = TlsLayer(self.tls_context)
        data = b""
        try:
            while not tls.handshake(data):
                if (answer := tls.pending()) and not await self._send_raw(conn, answer):
                    return False
                if not (data := await self._recv_raw(conn)):
                    self._metrics.rejected.labels(reason="tls").inc()
                    return False
        except TlsClosed:
            self._metrics.rejected.labels(reason="tls").inc()
            await self._send_raw(conn, tls.pending())  # the alert, if there is one
            return False
        conn.tls = tls
        return await self._send_raw(conn, tls.pending())

    def _refusal(self, conn: Connection, request: Request) -> tuple[int, str, str] | None:
        """Why an upgrade request is refused (HTTP status, metric reason, text), or None."""
        ws_cfg = self._config.websocket
        origin = next((v for k, v in request.extra_headers if k.lower() == b"origin"), None)
        path = urlsplit(request.target).path
        if self.stopping:
            return 503, "shutting_down", "server shutting down, try another node"
        if path not in ws_cfg.paths:
            return 404, "not_found", f"no WebSocket at {path}"[:200]
        if (
            ws_cfg.allowed_origins
            and origin is not None
            and origin.decode("latin-1") not in ws_cfg.allowed_origins
        ):
            return 403, "origin", "origin not allowed"
        if self._per_ip.get(conn.ip, 0) > ws_cfg.max_connections_per_ip:
            return 429, "per_ip", "too many connections from your address"
        if len(self.connections) >= ws_cfg.max_connections:
            return 503, "capacity", "server full, try another node"
        if not self._handshakes.take(trio.current_time()):
            return 503, "handshake_rate", "too many connection attempts, retry in a second"
        return None

    async def _reject(
        self, conn: Connection, handshake: H11Handshake, status: int, text: str
    ) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        if status in (429, 503):
            headers.append((b"retry-after", b"1"))
        try:
            data = handshake.send(
                RejectConnection(status_code=status, headers=headers, has_body=True)
            )
            data += handshake.send(RejectData(data=body))
        except Exception:  # the request was too broken for h11 to answer it: plain 400
            data = b"HTTP/1.1 %d Bad Request\r\nconnection: close\r\ncontent-length: %d\r\n" % (
                status, len(body))  # fmt: skip
            data += b"content-type: text/plain\r\n\r\n" + body
        with trio.move_on_after(self._limits.close_timeout_s):
            await self._send_now(conn, data)

    async def _read_loop(self, conn: Connection) -> None:
        """Bytes to wsproto, its events to the session. Every frame is charged to the
        connection's FrameBudget before it is looked at, whatever its opcode; a breach closes
        the connection (``BREACH_CLOSE``). Once closing, a connection that breaches again is
        read no more and ends at once: a flood costs at most a burst of frames after its
        close frame, and holds nothing for the close timeout."""
        ws = conn.ws
        assert ws is not None
        conn.frames = budget = FrameBudget(self._limits, trio.current_time())
        parts: list[str] = []
        size = 0
        reading = True
        while reading:
            data: bytes | None = None
            with trio.move_on_at(budget.deadline) as waited:  # a message must finish in time
                data = await self._recv_read(conn)  # each read is charged, TLS or not
            if waited.cancelled_caught:
                reading = self._breach(conn, budget, Breach.MESSAGE_TIMEOUT)
                continue
            if data is None or data:  # b"": a TLS read that completed no record
                ws.receive_data(data)
            events = 0
            for event in ws.events():
                events += 1
                now = trio.current_time()
                if isinstance(event, TextMessage | BytesMessage):
                    breach = budget.data(
                        now,
                        frame_finished=event.frame_finished,
                        message_finished=event.message_finished,
                    )
                else:
                    breach = budget.frame(now)
                if breach is not None and not (reading := self._breach(conn, budget, breach)):
                    break
                if isinstance(event, TextMessage | BytesMessage):
                    if conn.closing:
                        continue  # we are closing: nothing more is read
                    size += len(event.data)
                    if size > (max_bytes := self._limits.max_message_bytes):  # a reload's
                        self.end(conn, lifecycle.message_too_big(max_bytes))
                        parts.clear()
                        continue
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                    if event.message_finished:
                        text, binary = "".join(parts), isinstance(event, BytesMessage)
                        parts.clear()
                        size = 0
                        await self._on_message(conn, text, binary)
                elif isinstance(event, Ping):
                    if conn.phase is Phase.OPEN and ws.state is ConnectionState.OPEN:
                        self._answer_ping(conn, ws, event.payload)
                    # closing: RFC 6455 lets us leave it unanswered; the close frame is sent
                elif isinstance(event, CloseConnection):
                    self._on_close_frame(conn, ws, event)
                    return
            if data is None:
                return
            if not events and reading:  # a read that completed no frame costs one too
                breach = budget.frame(trio.current_time())
                reading = breach is None or self._breach(conn, budget, breach)
        # closing, and over its budget again: read no more, end it now (the close frame went
        # out with the flush after the first breach, or goes with the socket's last write)

    def _breach(self, conn: Connection, budget: FrameBudget, breach: Breach) -> bool:
        """Close a connection that broke its frame budget; False (read no more) if it was
        closing already."""
        budget.abandon()
        if conn.closing:
            return False
        self.end(conn, BREACH_CLOSE[breach])
        return True

    def _answer_ping(self, conn: Connection, ws: WsConnection, payload: bytes) -> None:
        """A pong for each ping while at most ``limits.max_pongs_owed`` wait to be written;
        past that, only the latest ping is answered, once the others are out (RFC 6455 5.5.3
        allows it): a client that pings and does not read costs a few pongs, not a buffer."""
        if not conn.unsent:
            conn.pongs_owed = 0
        if conn.pongs_owed < self._limits.max_pongs_owed:
            conn.pongs_owed += 1
            conn.pong_due = None  # this one is the latest
            self._queue(conn, ws.send(Pong(payload)))
        else:
            conn.pong_due = bytes(payload)

    def _on_close_frame(self, conn: Connection, ws: WsConnection, event: CloseConnection) -> None:
        """The peer's close frame, or a protocol error wsproto turned into one."""
        if ws.state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer it
            self.end(conn, lifecycle.by_client(event.code))
        elif ws.state is ConnectionState.OPEN:  # a protocol error wsproto found
            self.end(conn, lifecycle.protocol_error(event.code, event.reason))
        # LOCAL_CLOSING -> CLOSED: the client answered our close; nothing more to send

    async def _on_message(self, conn: Connection, text: str, binary: bool) -> None:
        session = conn.session
        assert session is not None
        now = trio.current_time()
        if not session.take_request(now):
            self.end(conn, lifecycle.RATE_LIMITED)
            return
        request_id: int | str | None = None
        try:
            if binary:
                raise RequestError(ErrorCode.BINARY_NOT_SUPPORTED)
            request = protocol.parse_request(text)
            request_id = request.id
            match request:
                case protocol.Auth():
                    await self._auth(conn, session, request, now)
                case protocol.Subscribe():
                    await self._subscribe(conn, session, request)
                case protocol.Unsubscribe():
                    for channel in session.unsubscribe(protocol.channels_of(request)):
                        self.hub.unsubscribe(conn, channel.internal)
                    self._send_ws(conn, protocol.encode_result(request_id))
                case protocol.Ping():
                    self._send_ws(conn, protocol.encode_pong(int(time.time() * 1000), request_id))
        except RequestError as err:
            if err.request_id is None:
                err.request_id = request_id
            self._metrics.errors.labels(code=str(int(err.code))).inc()
            if not conn.closing:
                self._send_ws(conn, protocol.encode_error(err))

    async def _subscribe(
        self, conn: Connection, session: Session, request: protocol.Subscribe
    ) -> None:
        """Join each new stream as pending (live events are kept for it), ask the bus what it
        missed or where it stands, then in one synchronous step: the reply, each stream's
        replay or current state, and the kept events after it."""
        names = protocol.channels_of(request)
        since = None
        if request.since is not None:
            if len(names) != 1:
                raise RequestError(ErrorCode.INVALID_REQUEST, "since takes exactly one channel")
            since = Position(request.since.epoch, request.since.seq)
        added = session.subscribe(names)
        for channel in added:
            self.hub.join(conn, channel)
        recoveries: list[Recovery] = []
        try:
            for channel in added:
                recoveries.append(await self._bus.recover(channel.internal, since))
        except BusUnavailable:
            for channel in session.unsubscribe([c.protocol for c in added]):
                self.hub.unsubscribe(conn, channel.internal)
            raise RequestError(ErrorCode.UNAVAILABLE) from None
        if conn.closing:
            return
        recovered: bool | None = None
        reason: str | None = None
        if since is not None:
            recovered, reason = self._recovered(conn, added, recoveries, since)
            if not recovered and recoveries and recoveries[0].recovered:  # cannot be paced
                recoveries[0] = Recovery(recoveries[0].position, False)
        mark = len(conn.out)
        streams = {}
        for channel, recovery in zip(added, recoveries, strict=True):
            start = self.hub.settle(conn, channel, recovery) or recovery.position
            streams[channel.protocol] = protocol.StreamPosition(start.epoch, start.seq)
        reply = protocol.encode_subscribed(streams, request.id, recovered, reason)
        if len(conn.out) == mark:
            self._send_ws(conn, reply)
        elif not conn.slow:  # the reply goes before the streams' first events
            conn.out[mark:mark] = text_frame(reply)

    async def _token_timer(self, conn: Connection, session: Session) -> None:
        """The login's token's lifetime: the ``@auth`` notice before ``exp``, then 4004 at
        ``exp``. The session owns the deadline: a login cancels the sleep (``token_wait``),
        so the timer asks again and follows the latest token's ``exp``, longer or shorter."""
        try:
            while not conn.closing and (at := session.token_check_at()) is not None:
                with trio.CancelScope() as conn.token_wait:
                    await trio.sleep(max(0.0, at - time.time()))
                if conn.closing:
                    return
                match session.token_due(time.time()):
                    case TokenNotice(expires_in=expires_in, exp=exp):
                        self._send_ws(conn, protocol.encode_auth_notice(expires_in, exp))
                    case TokenExpired():
                        self.end(conn, lifecycle.TOKEN_EXPIRED)
        finally:
            conn.token_wait = None

    def _recovered(
        self, conn: Connection, added: list[Channel], recoveries: list[Recovery], since: Position
    ) -> tuple[bool, str | None]:
        """Whether a ``since`` is answered with a replay, else why not: ``subscribed`` (the
        channel was already subscribed), ``epoch`` (the numbering restarted), ``history``
        (history no longer reaches back, or ``since`` is ahead of the stream), ``size`` (an
        event to replay is larger than the whole outbound buffer: it cannot be paced)."""
        if not added:
            return False, "subscribed"
        recovery = recoveries[0]
        if not recovery.recovered:
            return False, "epoch" if recovery.position.epoch != since.epoch else "history"
        reason = self.hub.unpaceable(conn, added[0], recovery)
        return reason is None, reason

    async def _auth(
        self, conn: Connection, session: Session, request: protocol.Auth, now: float
    ) -> None:
        session.check_login_allowed(now)
        try:
            login = await self._verifier.verify(request.token)
        except AuthUnavailable as exc:
            session.login_failed(now)  # a burst of tokens costs its connection either way
            self._metrics.auth.labels(result="unavailable").inc()
            log.warning("login backend unavailable", conn_id=conn.conn_id, error=str(exc))
            raise RequestError(ErrorCode.AUTH_UNAVAILABLE) from None
        except AuthError as exc:
            session.login_failed(now)
            self._metrics.auth.labels(result="failed").inc()
            log.info("login failed", conn_id=conn.conn_id, peer=conn.peer, error=str(exc))
            raise RequestError(ErrorCode.AUTH_FAILED) from None
        if conn.closing:
            return
        previous, uid = session.uid, login.uid
        for channel in session.login(uid, login.exp, time.time()):
            self.hub.unsubscribe(conn, channel.internal)
        if conn.token_wait is not None:
            conn.token_wait.cancel()  # the running timer reads the new exp
        elif login.exp is not None and conn.nursery is not None:
            conn.token_wait = trio.CancelScope()  # taken by the timer when it first sleeps
            conn.nursery.start_soon(self._token_timer, conn, session)
        if previous != uid:
            if previous is not None:
                self._leave_uid(conn, previous)
            self._by_uid.setdefault(uid, set()).add(conn)
        self._metrics.auth.labels(result="ok").inc()
        log.info("login", conn_id=conn.conn_id, uid=uid, previous_uid=previous)
        self._send_ws(conn, protocol.encode_result(request.id, uid=uid))
