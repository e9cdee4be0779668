"""The WebSocket gateway's Trio shell: it moves bytes and events between sockets and the rooms.

The rooms, each with one job (``__init__`` lists them): ``lifecycle`` (phases, writers, the
``Disconnect`` values), ``connection`` (one socket's bytes in and out), ``writer`` (the flusher
and the drains), ``admission`` (who gets in, sans-IO), ``requests`` (what messages mean: a
``Dialect``), and the sans-IO ``session``, ``hub`` and ``protocol`` below them.

Theory of operation
-------------------
A connection lives through four phases (``lifecycle``: the legal moves are listed there, and a
frame queued in a wrong phase raises)::

    HANDSHAKE --accept--> OPEN --end(Disconnect)--> CLOSING --socket closed--> CLOSED
        \\--refused (HTTP answer) or peer gone: end(gone)-/

It ends one way: ``Gateway.end`` with a ``Disconnect`` value (slow consumer, going away, the
client's close, ...). That is the only code that moves a connection out of OPEN: it
unsubscribes, queues the close frame through the hub's dirty path like every other write (or,
for an abort, ends the socket now), and counts ``closed{label}`` and the close code.

Per connection there is one task (its nursery's cancel scope is the connection's one scope: the
handshake timeout, then the close timeout or an abort), which reads: it feeds bytes to wsproto,
charges every frame to the connection's ``FrameBudget`` (any opcode; a breach closes it), hands
messages to the dialect, and answers pings. Writing is the ``writer``'s (one flusher, a drain
per full socket).

Whatever one peer causes ends that peer only: the connection task is an error boundary (log
line, metric, close 1011 where a close can still be sent), and so is each write of the flusher.
Only a failure of the gateway itself (cannot bind its port) ends the process.

(Over 400 lines: the read loop and ``end`` are the shell's two long methods, and each reads
best whole, beside the handshake and the error boundary they pair with.)
"""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import structlog
import trio
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from pushd.auth import Verifier
from pushd.bus.model import Bus
from pushd.config import Config, LimitsConfig, WebSocketConfig
from pushd.errors import TlsClosed
from pushd.gateway import admission, lifecycle
from pushd.gateway.admission import AcceptError, Admission, Refusal
from pushd.gateway.connection import Connection, Traffic
from pushd.gateway.hub import Hub
from pushd.gateway.lifecycle import Disconnect, Phase, Writer
from pushd.gateway.ratelimit import Breach, FrameBudget
from pushd.gateway.requests import Dialect, Requests
from pushd.gateway.upgrade import Upgrade
from pushd.gateway.writer import Flusher
from pushd.metrics import GatewayMetrics
from pushd.tls import server_context

ACCEPT_PAUSE_S = 0.1  # after an accept error that is not the peer's (trio's SLEEP_TIME)
BREACH_CLOSE = {  # how a connection that breaks its frame budget is closed
    Breach.FRAME_RATE: lifecycle.TOO_MANY_FRAMES,
    Breach.FRAGMENTS: lifecycle.TOO_MANY_FRAGMENTS,
    Breach.MESSAGE_TIMEOUT: lifecycle.MESSAGE_TIMEOUT,
}
CLOSE_SENDABLE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)  # wsproto sends a close

log = structlog.get_logger("pushd.gateway.server")


class Surface(NamedTuple):
    """A listener and the dialect it speaks: pushd's own (``NATIVE``: ``[websocket]``, its
    paths and limits) or another one over the same hub (the Binance surface, issue 21)."""

    name: str  # its config section, in log lines and errors
    listener: Callable[[Config], WebSocketConfig]  # host, port, TLS, admission limits
    limits: Callable[[Config], LimitsConfig]
    accepts: Callable[[str], bool] | None = None  # the paths served (None: listener's paths)
    dialect: Callable[[Gateway], Dialect] | None = None  # None: pushd's own (``Requests``)


NATIVE = Surface("websocket", lambda config: config.websocket, lambda config: config.limits)


class Gateway:
    def __init__(
        self, config: Config, hub: Hub, bus: Bus, verifier: Verifier, metrics: GatewayMetrics,
        surface: Surface = NATIVE, flusher: Flusher | None = None,
    ) -> None:  # fmt: skip
        """``flusher``: another gateway's over the same hub (a node's listeners share the one
        flusher that takes the hub's dirty list; the gateway that made it runs it)."""
        self._config = config
        self.surface = surface
        self._limits = surface.limits(config)
        self.hub = hub
        self._metrics = metrics
        self.connections: set[Connection] = set()
        listener = surface.listener(config)
        self._admission = Admission(listener, surface.accepts)
        self._traffic = Traffic()
        self._runs_flusher = flusher is None
        self.flusher = flusher or Flusher(hub, self._limits, metrics, self.end, self._fail)
        self.requests = Requests(
            frozenset(config.markets), self._limits, hub, bus, verifier, metrics, self.end
        )
        self._dialect: Dialect = self.requests if surface.dialect is None else surface.dialect(self)
        self._ids = itertools.count(1)
        self.tls_context = server_context(listener.tls, surface.name)
        self._all_closed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        self.stopping = False

    def reconfigure(self, config: Config, verifier: Verifier) -> None:
        """A reload: new admission rules, limits and logins for what comes next; open
        connections keep their buffers and get the new request limits."""
        self._config = config
        self._limits = limits = self.surface.limits(config)
        self._admission.reconfigure(self.surface.listener(config))
        if self._runs_flusher:
            self.flusher.reconfigure(limits)
        self._dialect.reconfigure(limits, verifier)
        for conn in self.connections:
            if conn.session is not None:
                conn.session.relimit(limits)
            if conn.frames is not None:
                conn.frames.retune(limits)

    @property
    def open_sockets(self) -> int:
        return self._admission.open_sockets

    @property
    def bytes_sent(self) -> int:
        return self._traffic.bytes_sent

    @property
    def flush_stall_max_s(self) -> float:
        """The longest the flusher ran without yielding."""
        return self.flusher.stall_max_s

    @property
    def flush_round_max_s(self) -> float:
        """The longest flush round's writing time (all its slices)."""
        return self.flusher.round_max_s

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
        ws_cfg = self.surface.listener(self._config)
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
            if self._runs_flusher:
                nursery.start_soon(self.flusher.run)
            self._dialect.serving(nursery)
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
                    kind = admission.accept_error(exc.errno)
                    if kind is AcceptError.GONE:
                        continue  # that peer went away before it was taken
                    if kind is AcceptError.CLOSED:  # closed under us: a bug, ended loudly
                        raise trio.ClosedResourceError("the listening socket is closed") from exc
                    if kind is AcceptError.CAPACITY:
                        log.error(
                            "accept failed", error=exc.strerror, open_sockets=self.open_sockets
                        )
                    else:
                        log.warning("accept failed", error=exc.strerror)
                    await trio.sleep(ACCEPT_PAUSE_S)  # it may persist: no busy loop
                    break
                ip = str(addr[0])
                if (dropped := self._admission.take_socket(ip)) is not None:
                    sock.close()  # far past a limit: not even a handshake
                    self._metrics.rejected.labels(reason=dropped).inc()
                    continue
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if self._limits.socket_send_buffer_bytes:
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_SNDBUF,
                            self._limits.socket_send_buffer_bytes,
                        )  # fmt: skip
                except OSError:  # reset between accept and here
                    sock.close()
                    self._release_socket(ip)
                    continue
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

    # -- what the cluster asks of this node (``pushd.bus.backplane.Node``) ------------------

    def kick(self, uid: str) -> int:
        """Close every connection logged in as ``uid`` (operator's request); returns how many."""
        return self.requests.kick(uid)

    def stats(self) -> dict[str, Any]:
        """This node's counters (what ``/v1/stats`` sums over the cluster's nodes)."""
        return {
            "connections": len(self.connections),
            **msgspec.to_builtins(self.hub.stats()),
            "flush_stall_max_ms": round(self.flush_stall_max_s * 1000, 3),
            "flush_round_max_ms": round(self.flush_round_max_s * 1000, 3),
        }

    def resync_private(self, gap_at: float | None = None) -> int:
        """Private events may have been lost before they got here: ``Hub.resync_private``."""
        return self.hub.resync_private(gap_at)

    # -- ending ------------------------------------------------------------------------------

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
        conn.leave_all()
        ws = conn.ws
        if disconnect.abort or ws is None or ws.state not in CLOSE_SENDABLE:
            conn.discard()
            if conn.scope is not None:
                conn.scope.cancel()
            return
        self._metrics.close_code(disconnect.by, int(disconnect.code))
        reason = disconnect.echo if disconnect.by == "client" else disconnect.reason
        close = CloseConnection(code=disconnect.code, reason=reason)
        self.hub.close_with(conn.outlet, ws.send(close))  # through the dirty path
        if conn.scope is not None:
            conn.scope.deadline = min(
                conn.scope.deadline, trio.current_time() + self._limits.close_timeout_s
            )

    def _fail(self, conn: Connection) -> None:
        """This connection hit a bug or an impossible state: 1011 if a close can still be sent,
        then the socket closes. Nobody else is touched."""
        self.end(conn, lifecycle.INTERNAL_ERROR if conn.phase is Phase.OPEN else lifecycle.BROKEN)

    # -- one connection ----------------------------------------------------------------------

    async def _handle(self, sock: socket.socket, ip: str, peer: str) -> None:
        """One connection's task. Its nursery's cancel scope is the connection's one scope:
        ``end`` cancels it (an abort) or gives it the close timeout as its deadline, and
        before the upgrade it carries the handshake timeout as its deadline."""
        conn = Connection(
            sock, ip, peer, next(self._ids), self._limits.outbound_buffer_bytes, self.hub,
            self._traffic,
        )  # fmt: skip
        try:
            try:
                async with trio.open_nursery() as conn.nursery:
                    if await self._handshake(conn):
                        await self._serve_open(conn)
                    conn.nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # the error boundary: this peer ends only
                self._shell_writes(conn)
                errors, cancelled = group.split(Exception)
                if errors is not None:
                    log.error("connection failed", conn_id=conn.conn_id, peer=peer, exc_info=errors)
                    self._fail(conn)
                if cancelled is not None:
                    raise cancelled from None
                if conn.unsent:  # the 1011 close frame
                    with trio.move_on_after(self._limits.close_timeout_s):
                        await conn.send_now(bytes(conn.outlet.out))
                    conn.outlet.out.clear()
        finally:
            try:
                if not conn.closing:  # the peer went away, or its handshake ended unanswered
                    self.end(conn, lifecycle.gone(conn.gone_reason))
                self._shell_writes(conn)
                self._forget(conn)
                conn.last_words()  # a last close frame, if the kernel takes it now
                conn.life.closed()
            except Exception:  # a state bug: it costs this connection, never the gateway
                log.exception("connection ended in a broken state", conn_id=conn.conn_id, peer=peer)
                self.connections.discard(conn)
            finally:  # whatever the bookkeeping did, the socket and its per-IP slot are freed
                trio.lowlevel.notify_closing(sock)
                sock.close()
                self._release_socket(ip)
            if conn.ws is not None:
                log.info(
                    "connection closed", conn_id=conn.conn_id, peer=peer,
                    reason=conn.close_reason, uid=conn.uid,
                )  # fmt: skip

    async def _serve_open(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._metrics.opened.inc()
        log.info("connection open", conn_id=conn.conn_id, peer=conn.peer)
        if self.stopping:  # shutdown began while this handshake was answered
            self.end(conn, lifecycle.GOING_AWAY)
        await self._read_loop(conn)

    @staticmethod
    def _shell_writes(conn: Connection) -> None:
        """The connection's task has left its nursery (no drain runs): it is the socket's only
        writer from here."""
        if conn.life.writer is not Writer.SHELL:
            conn.life.hand_to(Writer.SHELL)

    def _forget(self, conn: Connection) -> None:
        """An ended connection leaves the gateway's registries."""
        if conn in self.connections:
            self.connections.discard(conn)
            self._metrics.closed_total.inc()
            self._dialect.closed(conn)

    def _release_socket(self, ip: str) -> None:
        self._admission.release(ip)
        if not self.open_sockets:
            self._all_closed.set()
            self._all_closed = trio.Event()

    async def _handshake(self, conn: Connection) -> bool:
        """Read the upgrade request and answer it; True once the WebSocket is open."""
        upgrade = Upgrade()
        scope = conn.scope
        assert scope is not None
        scope.deadline = trio.current_time() + self._limits.handshake_timeout_s
        got: Request | Refusal | None
        try:
            got = await conn.read_request(upgrade, self.tls_context)
        except TlsClosed:
            got = admission.TLS
        except trio.Cancelled:
            if scope.cancel_called:  # nothing but its deadline ends a connection not yet open
                self._metrics.rejected.labels(reason=admission.TIMED_OUT.label).inc()
            raise
        scope.deadline = math.inf
        if got is None:  # the peer went away
            return False
        if isinstance(got, Request):
            conn.target = got.target
        refusal = (
            got
            if isinstance(got, Refusal)
            else self._admission.refusal(
                got, conn.ip, len(self.connections), self.stopping, trio.current_time()
            )
        )
        if refusal is not None:
            self._metrics.rejected.labels(reason=refusal.label).inc()
            if refusal is admission.TLS:  # (a timeout is counted where it cancels the read)
                return False  # nothing to answer
            with trio.move_on_after(self._limits.close_timeout_s):
                await conn.send_now(upgrade.refuse(refusal))
            return False
        accepted, ws = upgrade.accept()
        if not await conn.send_now(accepted):
            return False
        conn.ws = ws
        self._dialect.opened(conn, trio.current_time())
        conn.life.opened()
        return True

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
            if budget.deadline == math.inf:  # no message under way: no scope to enter
                data = await conn.recv_read()  # each read is charged, TLS or not
            else:
                with trio.move_on_at(budget.deadline) as waited:  # a message must finish in time
                    data = await conn.recv_read()
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
                        await self._dialect.on_message(conn, text, binary)
                elif isinstance(event, Ping):
                    conn.answer_ping(event.payload, self._limits.max_pongs_owed)
                elif isinstance(event, Pong):  # a dialect that pings reads when (Binance)
                    conn.pong_at = now
                elif isinstance(event, CloseConnection):
                    self._on_close_frame(conn, event)
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

    def _on_close_frame(self, conn: Connection, event: CloseConnection) -> None:
        """The peer's close frame, or a protocol error wsproto turned into one."""
        ws = conn.ws
        assert ws is not None
        if ws.state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer it
            self.end(conn, lifecycle.by_client(event.code, event.reason))
        elif ws.state is ConnectionState.OPEN:  # a protocol error wsproto found
            self.end(conn, lifecycle.protocol_error(event.code, event.reason))
        # LOCAL_CLOSING -> CLOSED: the client answered our close; nothing more to send
