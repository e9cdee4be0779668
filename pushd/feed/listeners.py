"""Ingest listeners: the engine's UDP datagrams and TCP frames, into ``Intake``. Trio shell.

Refused and bad input is counted, logged (at most one line per second per listener and kind,
with the count of what was not logged) and dropped. A TCP peer that sends a frame with an
impossible length is disconnected; its sequence numbering tells the daemon what was lost.

A TCP peer holds a slot only once it has authenticated: a frame sealed with its source's key
that its source's sequence takes (or a jump ahead; ``admits``). A frame captured on the wire
and sent again is a duplicate: it admits nobody. Until then the peer waits, at most
``auth_timeout_s``; a peer whose first frame is not validly sealed is dropped at once, and when
``max_tcp_peers`` peers already wait, the one waiting longest is dropped to make room: idle
connections and replayers cannot keep the engine out. An authenticated
peer is closed once it has sent no *accepted* frame (a valid seal, and a sequence verdict that
takes it: in order, a gap, a restart) for ``peer_idle_s``: senders beat once a second when idle,
so only a dead or hostile peer is that quiet. A replay (a duplicate inside the replay window)
or a refused frame does not count, so replayed frames hold a slot at most that long after a
valid first frame.

A TCP frame that asks for an ack (``"ack": true``, a backend waiting for its publish) is
answered on its connection once dealt with, in order; acks of frames read together go out in
one write (a peer that asks for acks and does not read them is slowed by TCP, not buffered;
once that write has waited ``ack_timeout_s`` the peer is closed).
Over UDP the flag is ignored.

Each datagram and each TCP peer is an error boundary: whatever one of them causes (a frame that
trips a bug further in, a reset at any moment) is counted as a bad frame or ends that peer, with
a log line; the listener and the daemon go on.
"""

from __future__ import annotations

import errno
import math
import socket
import time
from collections import Counter
from collections.abc import Callable

import structlog
import trio

from ingest import wire
from pushd.config import IngestConfig
from pushd.feed.intake import Intake, Received
from pushd.feed.sequencing import Verdict
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.ingest")

RECV_BYTES = 1 << 18
# why a TCP peer was dropped (the metric's reasons): before it authenticated, then after
PEER_DROP_REASONS = ("auth_timeout", "evicted", "refused", "full", "idle", "ack_stalled")


class FrameLogs:
    """The throttled log lines of one listener: refused frames, bad ones, private events from
    a source without permission, a second engine sending as one source."""

    def __init__(self, transport: str) -> None:
        self.refused = ThrottledLog(log, f"{transport} engine frame refused")
        self.bad = ThrottledLog(
            log, "bad UDP datagram dropped" if transport == "UDP" else "bad TCP frame"
        )
        self.not_permitted = ThrottledLog(
            log, "private events dropped: their source may not carry them"
        )
        self.publish_refused = ThrottledLog(
            log, "publishes refused: not permitted to the source, or not what backends own"
        )
        self.conflict = ThrottledLog(log, "two engines send as one source")
        self.dropped = ThrottledLog(log, "ingest TCP peer dropped before it authenticated")

    def tell(self, got: Received, peer: str) -> None:
        """Log what is worth a line (at most one a second of each kind)."""
        if got.refusal is not None:
            self.refused.warning(peer=peer, reason=got.refusal.value, src=got.src)
        elif got.error:
            self.bad.warning(peer=peer, error=got.error, src=got.src)
        elif got.not_permitted or got.refused_publishes:
            if got.not_permitted:
                self.not_permitted.warning(peer=peer, src=got.src, events=got.not_permitted)
            if got.refused_publishes:
                self.publish_refused.warning(peer=peer, src=got.src, events=got.refused_publishes)
        elif got.verdict is Verdict.CONFLICT:
            self.conflict.warning(
                peer=peer, src=got.src, why="an older epoch still numbers frames: the newest "
                "epoch wins, the other engine's frames are dropped",
            )  # fmt: skip


async def serve_udp(
    config: IngestConfig,
    intake: Intake,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive engine datagrams; reports the bound port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.udp_receive_buffer_bytes)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < config.udp_receive_buffer_bytes:
            log.warning(
                "UDP receive buffer capped by the kernel (raise net.core.rmem_max)",
                asked=config.udp_receive_buffer_bytes,
                granted=granted,
            )
        sock.bind((config.udp_host, config.udp_port))
        sock.setblocking(False)
        task_status.started(sock.getsockname()[1])
        logs = FrameLogs("UDP")
        while True:
            await trio.lowlevel.wait_readable(sock)
            now, wall_ns = trio.current_time(), time.time_ns()
            for _ in range(256):  # drain what is queued, then let others run
                try:
                    data, addr = sock.recvfrom(wire.MAX_DATAGRAM_BYTES + 1)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                        continue
                    raise
                if len(data) > wire.MAX_DATAGRAM_BYTES:
                    intake.bad_frame("udp")
                    logs.bad.warning(peer=f"{addr[0]}:{addr[1]}", error="datagram too large")
                    continue
                try:
                    got = intake.receive(data, "udp", now, wall_ns)
                except Exception:  # a valid frame that tripped a bug further in: drop it only
                    intake.bad_frame("udp")
                    log.exception("engine frame failed", peer=f"{addr[0]}:{addr[1]}")
                    continue
                if got.quiet:  # the common case: nothing to tell
                    continue
                logs.tell(got, f"{addr[0]}:{addr[1]}")
            await trio.lowlevel.checkpoint()


class TcpPeers:
    """The ingest TCP listener's peers: how many wait to authenticate or have, and how many
    were dropped, by reason (read by the metrics)."""

    def __init__(self) -> None:
        self.waiting: dict[object, _Waiting] = {}  # oldest first
        self.authenticated = 0
        self.dropped: Counter[str] = Counter()  # by PEER_DROP_REASONS


class _Waiting:
    __slots__ = ("evicted", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.evicted = False


async def serve_tcp(
    config: IngestConfig,
    intake: Intake,
    peers: TcpPeers | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept engine TCP connections; reports the bound port."""
    listeners = await trio.open_tcp_listeners(config.tcp_port, host=config.tcp_host)
    state = peers if peers is not None else TcpPeers()
    logs = FrameLogs("TCP")

    async def handle(stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:  # reset before we looked: nothing to serve
            await stream.aclose()
            return
        if len(state.waiting) >= config.max_tcp_peers:  # make room: the longest waiting goes
            oldest = state.waiting.pop(next(iter(state.waiting)))
            oldest.evicted = True
            oldest.scope.cancel()
        token = object()
        waiting = _Waiting(trio.CancelScope(deadline=trio.current_time() + config.auth_timeout_s))
        state.waiting[token] = waiting
        authenticated = False

        def admit() -> bool:
            """The peer's first valid frame: a slot, if one is free, and the idle deadline."""
            nonlocal authenticated
            state.waiting.pop(token, None)
            alive(trio.current_time())
            if waiting.evicted or state.authenticated >= config.max_tcp_peers:
                return False  # (evicted with its admitting frame already read: it goes)
            state.authenticated += 1
            authenticated = True
            log.info("ingest peer authenticated", peer=peer)
            return True

        def alive(now: float) -> None:
            """An accepted frame (or the admission): the idle deadline starts again."""
            waiting.scope.deadline = idle_deadline(now, config.peer_idle_s)

        reason = "peer closed"
        try:
            async with stream:
                with waiting.scope:
                    reason = await _read_frames(
                        stream, intake, logs, peer, admit, alive, config.ack_timeout_s
                    )
                if waiting.scope.cancelled_caught or (waiting.evicted and not authenticated):
                    if authenticated:
                        reason = "idle"
                    else:
                        reason = "evicted" if waiting.evicted else "auth_timeout"
        except (trio.BrokenResourceError, OSError):
            reason = "connection reset"
        except Exception:  # the error boundary: this peer ends, the listener goes on
            log.exception("ingest peer failed", peer=peer)
            reason = "internal error"
        finally:
            state.waiting.pop(token, None)
            if authenticated:
                state.authenticated -= 1
            if reason in PEER_DROP_REASONS:
                state.dropped[reason] += 1
                if authenticated:
                    log.warning("ingest peer dropped", peer=peer, reason=reason)
                else:  # strangers can be many: throttled
                    logs.dropped.warning(peer=peer, reason=reason)
            elif authenticated:
                log.info("ingest peer disconnected", peer=peer, reason=reason)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def admits(verdict: Verdict) -> bool:
    """Whether a validly sealed frame authenticates its TCP peer: one its source's sequence
    takes, or a jump ahead (only the key holder can seal a frame that far ahead: an engine
    that numbered on while its link was down); not a duplicate or stale frame, which anyone
    who captured one on the wire can send again."""
    return verdict.accepted or verdict is Verdict.JUMP


def idle_deadline(now: float, peer_idle_s: float) -> float:
    """When an admitted peer that last sent an accepted frame at ``now`` is closed as idle."""
    return now + peer_idle_s if peer_idle_s else math.inf


async def _read_frames(
    stream: trio.SocketStream,
    intake: Intake,
    logs: FrameLogs,
    peer: str,
    admit: Callable[[], bool],
    alive: Callable[[float], None],
    ack_timeout_s: float,
) -> str:
    """Frames from one engine connection into ``intake`` until it ends; returns why it ended.
    A frame that is not validly sealed ends a peer that has not authenticated; a validly sealed
    one authenticates it (``admit``) if its sequence admits it (``admits``), else it is
    answered and the peer goes on waiting (``auth_timeout_s``, the caller's); until it
    has, a frame may be at most ``MAX_FIRST_FRAME_BYTES`` (a stranger's big length ends it).
    Each accepted frame after that tells ``alive``; acks not written in ``ack_timeout_s`` end
    the connection (``ack_stalled``)."""
    decoder = wire.StreamDecoder(max_frame=wire.MAX_FIRST_FRAME_BYTES)
    admitted = False
    acks: list[bytes] = []
    while data := await stream.receive_some(RECV_BYTES):
        decoder.feed(data)
        now, wall_ns = trio.current_time(), time.time_ns()
        accepted = False
        while True:
            try:
                body = decoder.next_body()
            except wire.WireError as exc:  # an impossible length: the stream is lost
                intake.bad_frame("tcp")
                logs.bad.warning(peer=peer, error=str(exc)[:200])
                return "unframeable input" if admitted else "refused"
            if body is None:
                break
            try:
                got = intake.receive(body, "tcp", now, wall_ns)
            except Exception:  # a valid frame that tripped a bug further in: drop it only
                intake.bad_frame("tcp")
                log.exception("engine frame failed", peer=peer)
                continue
            logs.tell(got, peer)
            if not admitted:
                if not got.authenticated:
                    return "refused"
                if got.verdict is not None and admits(got.verdict):
                    if not admit():
                        return "full"
                    admitted = True
                    decoder.max_frame = wire.MAX_FRAME_BYTES
                # else a valid seal on a frame not taken (a duplicate: a replay, or a frame
                # resent after a reconnect): answered, and the peer still waits to authenticate
            elif got.verdict is not None and got.verdict.accepted:
                accepted = True
            if got.ack is not None:
                acks.append(wire.encode_ack(got.ack))
        if accepted:
            alive(now)
        if acks:
            with trio.move_on_after(ack_timeout_s):
                await stream.send_all(b"".join(acks))
                acks.clear()
            if acks:  # the peer does not read its acks: its slot goes to someone who does
                return "ack_stalled"
    if decoder.buffered:  # the peer closed in the middle of a frame
        intake.bad_frame("tcp")
        logs.bad.warning(
            peer=peer, error=f"connection closed inside a frame ({decoder.buffered} B)"
        )
        return "closed inside a frame"
    return "peer closed"
