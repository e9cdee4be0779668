"""Ingest listeners: the engine's UDP datagrams and TCP frames, into ``Intake``. Trio shell.

Bad input is counted, logged (at most one line per second per listener, with the count of what
was not logged) and dropped. A TCP peer that sends a frame with an impossible length is
disconnected; its sequence numbering tells the daemon what was lost. Other peers go on.

Each datagram and each TCP peer is an error boundary: whatever one of them causes (a frame that
trips a bug further in, a reset at any moment) is counted as a bad frame or ends that peer, with
a log line; the listener and the daemon go on.
"""

from __future__ import annotations

import errno
import socket

import structlog
import trio

from ingest import wire
from pushd.config import IngestConfig
from pushd.feed.intake import Intake
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.ingest")

RECV_BYTES = 1 << 18


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
        bad = ThrottledLog(log, "bad UDP datagram dropped")
        while True:
            await trio.lowlevel.wait_readable(sock)
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
                    bad.warning(peer=f"{addr[0]}:{addr[1]}", error="datagram too large")
                    continue
                try:
                    intake.frame(wire.decode(data))
                except wire.WireError as exc:
                    intake.bad_frame("udp")
                    bad.warning(peer=f"{addr[0]}:{addr[1]}", error=str(exc)[:200])
                except Exception:  # a valid frame that tripped a bug further in: drop it only
                    intake.bad_frame("udp")
                    log.exception("engine frame failed", peer=f"{addr[0]}:{addr[1]}")
            await trio.lowlevel.checkpoint()


async def serve_tcp(
    config: IngestConfig,
    intake: Intake,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept engine TCP connections; reports the bound port."""
    listeners = await trio.open_tcp_listeners(config.tcp_port, host=config.tcp_host)
    peers = 0
    bad = ThrottledLog(log, "bad TCP frame")

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal peers
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:  # reset before we looked: nothing to serve
            await stream.aclose()
            return
        if peers >= config.max_tcp_peers:
            log.warning("ingest TCP peer refused: too many peers", peer=peer)
            await stream.aclose()
            return
        peers += 1
        log.info("ingest peer connected", peer=peer)
        reason = "peer closed"
        try:
            async with stream:
                reason = await _read_frames(stream, intake, bad, peer)
        except (trio.BrokenResourceError, OSError):
            reason = "connection reset"
        except Exception:  # the error boundary: this peer ends, the listener goes on
            log.exception("ingest peer failed", peer=peer)
            reason = "internal error"
        finally:
            peers -= 1
            log.info("ingest peer disconnected", peer=peer, reason=reason)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def _read_frames(
    stream: trio.SocketStream, intake: Intake, bad: ThrottledLog, peer: str
) -> str:
    """Frames from one engine connection into ``intake`` until it ends; returns why it ended."""
    decoder = wire.StreamDecoder()
    while data := await stream.receive_some(RECV_BYTES):
        decoder.feed(data)
        while True:
            try:
                envelope = decoder.next_frame()
            except wire.WireError as exc:
                intake.bad_frame("tcp")
                bad.warning(peer=peer, error=str(exc)[:200])
                if decoder.broken:
                    return "unframeable input"
                continue
            if envelope is None:
                break
            try:
                intake.frame(envelope)
            except Exception:  # a valid frame that tripped a bug further in: drop it only
                intake.bad_frame("tcp")
                log.exception("engine frame failed", peer=peer)
    if decoder.buffered:  # the peer closed in the middle of a frame
        intake.bad_frame("tcp")
        bad.warning(peer=peer, error=f"connection closed inside a frame ({decoder.buffered} B)")
        return "closed inside a frame"
    return "peer closed"
