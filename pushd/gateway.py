"""The WebSocket gateway: Trio shell around wsproto, Session and Hub.

Per connection there is one task, which reads: it feeds bytes to wsproto, hands requests to the
Session, and queues replies through the Hub. Writing has exactly one owner at a time:

- the gateway's single *flusher* task writes every dirty outlet with one non-blocking ``send``
  after the publishers of a scheduler tick have run (frames of one tick coalesce into one
  syscall per connection);
- if the kernel buffer is full, the rest is left to a *drain* task started in that connection's
  nursery, which waits until the socket is writable; the flusher skips the connection meanwhile.
  A drain that sees no progress for ``stall_timeout_s`` ends the connection (slow consumer).

Sockets are plain non-blocking stdlib sockets waited on with ``trio.lowlevel``; nothing else
touches them, so no lock is needed anywhere on the fan-out path.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import time
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
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from pushd import protocol
from pushd.auth import Verifier
from pushd.config import Config
from pushd.errors import AuthError, AuthUnavailable, CloseCode, ErrorCode, RequestError
from pushd.hub import Hub, Outlet, text_frame
from pushd.metrics import GatewayMetrics
from pushd.session import Session

RECV_BYTES = 65536
ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_PAUSE_S = 0.1

log = structlog.get_logger("pushd.gateway")


class Connection(Outlet):
    """One client: its socket, its wsproto state, its Session, and its place in the hub."""

    __slots__ = (
        "close_reason",
        "closing",
        "conn_id",
        "draining",
        "nursery",
        "peer",
        "scope",
        "session",
        "sock",
        "ws",
    )

    def __init__(self, sock: socket.socket, peer: str, conn_id: int, limit: int) -> None:
        super().__init__(limit)
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        self.ws: WsConnection | None = None
        self.session: Session | None = None
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.draining = False
        self.closing = False
        self.close_reason = "client went away"


class Gateway:
    def __init__(
        self, config: Config, hub: Hub, verifier: Verifier, metrics: GatewayMetrics
    ) -> None:
        self._config = config
        self._limits = config.limits
        self._symbols = frozenset(config.markets)
        self.hub = hub
        self._verifier = verifier
        self._metrics = metrics
        self.connections: set[Connection] = set()
        self._by_uid: dict[str, set[Connection]] = {}
        self._sockets = 0
        self._ids = itertools.count(1)
        self._flush_wanted = trio.Event()
        self._all_closed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        hub.on_dirty = self._flush_wanted_set

    def _flush_wanted_set(self) -> None:
        self._flush_wanted.set()

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; reports the bound port through ``task_status``."""
        ws_cfg = self._config.websocket
        listener = socket.create_server(
            (ws_cfg.host, ws_cfg.port), backlog=ws_cfg.backlog, reuse_port=False
        )
        listener.setblocking(False)
        with listener:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flusher)
                with trio.CancelScope() as self._accepting:
                    task_status.started(listener.getsockname()[1])
                    await self._accept_loop(listener, nursery)
                # accepting stopped (shutdown): connections finish in the nursery

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
                        raise
                    log.error("accept failed", error=exc.strerror, open_sockets=self._sockets)
                    await trio.sleep(ACCEPT_PAUSE_S)
                    break
                if self._sockets >= self._config.websocket.max_connections + 64:
                    sock.close()  # far past the limit: not even a handshake
                    self._metrics.rejected.labels(reason="capacity").inc()
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets += 1
                nursery.start_soon(self._handle, sock, f"{addr[0]}:{addr[1]}")

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; close every client with 1001 and wait up to ``grace_s`` for them."""
        if self._accepting is not None:
            self._accepting.cancel()
        for conn in list(self.connections):
            self.close(conn, CloseCode.GOING_AWAY, "server shutting down")
        if self.connections:
            with trio.move_on_after(grace_s):
                await self._all_closed.wait()

    def kick(self, uid: str) -> int:
        """Close every connection logged in as ``uid`` (operator's request); returns how many."""
        conns = list(self._by_uid.get(uid, ()))
        for conn in conns:
            self.close(conn, CloseCode.KICKED, "disconnected by operator")
        return len(conns)

    # -- writing ---------------------------------------------------------------------------

    async def _flusher(self) -> None:
        hub = self.hub
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            dirty, hub.dirty = hub.dirty, []
            for outlet in dirty:
                self._flush(outlet)  # type: ignore[arg-type]  # gateway outlets are Connections

    def _flush(self, conn: Connection) -> None:
        if conn.slow and not conn.closing:
            self._metrics.closed.labels(reason="slow_consumer").inc()
            self.close(conn, CloseCode.SLOW_CONSUMER, "slow consumer: outbound buffer full")
            return
        if conn.draining or not conn.out or conn.nursery is None:
            return
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._abort(conn, "connection reset while writing")
            return
        del conn.out[:sent]
        if conn.out:
            conn.draining = True
            conn.nursery.start_soon(self._drain, conn)
        elif conn.lagging:
            self.hub.drained(conn)

    async def _drain(self, conn: Connection) -> None:
        try:
            while conn.out:
                with trio.move_on_after(self._limits.stall_timeout_s) as stalled:
                    await trio.lowlevel.wait_writable(conn.sock)
                if stalled.cancelled_caught:
                    self._metrics.closed.labels(reason="stalled").inc()
                    self._abort(conn, "slow consumer: no progress writing")
                    return
                try:
                    sent = conn.sock.send(conn.out)
                except BlockingIOError:
                    continue
                except OSError:
                    self._abort(conn, "connection reset while writing")
                    return
                del conn.out[:sent]
        finally:
            conn.draining = False
        if conn.slow:
            self._flush(conn)
        elif conn.lagging:
            self.hub.drained(conn)

    def _send_ws(self, conn: Connection, payload: bytes) -> None:
        self.hub.send(conn, text_frame(payload))

    def close(self, conn: Connection, code: CloseCode, reason: str) -> None:
        """Begin a close handshake: no more events, a close frame, a deadline to finish."""
        if conn.closing:
            return
        conn.closing = True
        conn.close_reason = reason
        self._unsubscribe_all(conn)
        ws = conn.ws
        if ws is not None and ws.state is ConnectionState.OPEN:
            conn.out += ws.send(CloseConnection(code=int(code), reason=reason))
            conn.slow = False
            self.hub.dirty.append(conn)
            self._flush_wanted.set()
        if conn.scope is not None:
            conn.scope.deadline = min(
                conn.scope.deadline, trio.current_time() + self._limits.close_timeout_s
            )

    def _abort(self, conn: Connection, reason: str) -> None:
        """End a connection at once, without a close handshake (peer gone or not reading)."""
        if not conn.closing:
            conn.close_reason = reason
            conn.closing = True
        self._unsubscribe_all(conn)
        conn.out.clear()
        if conn.scope is not None:
            conn.scope.cancel()

    def _unsubscribe_all(self, conn: Connection) -> None:
        if conn.session is not None:
            for internal in conn.session.subscriptions:
                self.hub.unsubscribe(conn, internal)
            conn.session.subscriptions.clear()

    # -- one connection ----------------------------------------------------------------------

    async def _handle(self, sock: socket.socket, peer: str) -> None:
        conn = Connection(sock, peer, next(self._ids), self._limits.outbound_buffer_bytes)
        bound = log.bind(conn_id=conn.conn_id, peer=peer)
        try:
            with trio.CancelScope() as conn.scope:
                async with trio.open_nursery() as conn.nursery:
                    if await self._handshake(conn):
                        self.connections.add(conn)
                        self._metrics.opened.inc()
                        bound.info("connection open")
                        await self._read_loop(conn)
                    conn.nursery.cancel_scope.cancel()
        finally:
            self._forget(conn)
            if conn.out:  # a last close frame, if the kernel takes it now
                with contextlib.suppress(OSError):
                    sock.send(conn.out)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._sockets -= 1
            if conn.ws is not None:
                bound.info("connection closed", reason=conn.close_reason, uid=self._uid_of(conn))

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
            if not self.connections:
                self._all_closed.set()
                self._all_closed = trio.Event()

    def _leave_uid(self, conn: Connection, uid: str) -> None:
        peers = self._by_uid.get(uid)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_uid[uid]

    async def _recv(self, conn: Connection) -> bytes:
        """Next bytes from the peer; b"" when it closed or reset the connection."""
        while True:
            await trio.lowlevel.wait_readable(conn.sock)
            try:
                return conn.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    async def _send_now(self, conn: Connection, data: bytes) -> None:
        """Write before the connection joins the hub (handshake answers): no other writer yet."""
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(conn.sock)
            try:
                view = view[conn.sock.send(view) :]
            except BlockingIOError:
                continue

    async def _handshake(self, conn: Connection) -> bool:
        handshake = H11Handshake(ConnectionType.SERVER)
        with trio.move_on_after(self._limits.handshake_timeout_s):
            try:
                while True:
                    data = await self._recv(conn)
                    if not data:
                        return False
                    handshake.receive_data(data)
                    for event in handshake.events():
                        if isinstance(event, Request):
                            return await self._answer_upgrade(conn, handshake, event)
            except RemoteProtocolError as exc:
                self._metrics.rejected.labels(reason="bad_handshake").inc()
                await self._reject(conn, handshake, 400, f"bad WebSocket handshake: {exc}")
                return False
            except OSError:
                return False
        self._metrics.rejected.labels(reason="handshake_timeout").inc()
        return False

    async def _answer_upgrade(
        self, conn: Connection, handshake: H11Handshake, request: Request
    ) -> bool:
        ws_cfg = self._config.websocket
        origin = next((v for k, v in request.extra_headers if k.lower() == b"origin"), None)
        path = urlsplit(request.target).path
        if path not in ws_cfg.paths:
            refusal: tuple[int, str, str] | None = (404, "not_found", f"no WebSocket at {path}")
        elif (
            ws_cfg.allowed_origins
            and origin is not None
            and origin.decode("latin-1") not in ws_cfg.allowed_origins
        ):
            refusal = (403, "origin", "origin not allowed")
        elif len(self.connections) >= ws_cfg.max_connections:
            refusal = (503, "capacity", "server full, try another node")
        else:
            refusal = None
        if refusal is not None:
            status, reason, text = refusal
            self._metrics.rejected.labels(reason=reason).inc()
            await self._reject(conn, handshake, status, text)
            return False
        await self._send_now(conn, handshake.send(AcceptConnection()))
        conn.ws = handshake.connection
        conn.session = Session(self._symbols, self._limits, trio.current_time())
        return conn.ws is not None

    async def _reject(
        self, conn: Connection, handshake: H11Handshake, status: int, text: str
    ) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        try:
            data = handshake.send(
                RejectConnection(status_code=status, headers=headers, has_body=True)
            )
            data += handshake.send(RejectData(data=body))
        except Exception:  # the handshake is too broken to answer at all
            return
        with trio.move_on_after(self._limits.close_timeout_s):
            await self._send_now(conn, data)

    async def _read_loop(self, conn: Connection) -> None:
        ws = conn.ws
        assert ws is not None
        max_bytes = self._limits.max_message_bytes
        parts: list[str] = []
        size = 0
        while True:
            data = await self._recv(conn)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    size += len(event.data)
                    if size > max_bytes:
                        self._metrics.closed.labels(reason="message_too_big").inc()
                        self.close(conn, CloseCode.MESSAGE_TOO_BIG, f"message over {max_bytes} B")
                        parts.clear()
                        continue
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                    if event.message_finished:
                        text, binary = "".join(parts), isinstance(event, BytesMessage)
                        parts.clear()
                        size = 0
                        if not conn.closing:
                            await self._on_message(conn, text, binary)
                elif isinstance(event, Ping):
                    self.hub.send(conn, ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        conn.close_reason = f"client closed ({event.code})"
                        conn.out += ws.send(event.response())
                    elif ws.state is ConnectionState.OPEN:  # a protocol error wsproto found
                        conn.close_reason = f"protocol error: {event.reason}"
                        conn.out += ws.send(CloseConnection(code=event.code, reason=event.reason))
                    return
            if not data:
                return

    async def _on_message(self, conn: Connection, text: str, binary: bool) -> None:
        session = conn.session
        assert session is not None
        now = trio.current_time()
        if not session.take_request(now):
            self._metrics.closed.labels(reason="rate_limited").inc()
            self.close(conn, CloseCode.RATE_LIMITED, "too many requests")
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
                    added = session.subscribe(protocol.channels_of(request))
                    # the reply first, then each stream's current state: one synchronous step,
                    # so no event can come between the state and the stream that follows it
                    self._send_ws(conn, protocol.encode_result(request_id))
                    for channel in added:
                        self.hub.subscribe(conn, channel)
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
            self._send_ws(conn, protocol.encode_error(err))

    async def _auth(
        self, conn: Connection, session: Session, request: protocol.Auth, now: float
    ) -> None:
        session.check_login_allowed(now)
        try:
            uid = await self._verifier.verify(request.token)
        except AuthUnavailable as exc:
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
        previous = session.uid
        for channel in session.login(uid):
            self.hub.unsubscribe(conn, channel.internal)
        if previous != uid:
            if previous is not None:
                self._leave_uid(conn, previous)
            self._by_uid.setdefault(uid, set()).add(conn)
        self._metrics.auth.labels(result="ok").inc()
        log.info("login", conn_id=conn.conn_id, uid=uid, previous_uid=previous)
        self._send_ws(conn, protocol.encode_result(request.id, uid=uid))
