"""Trio senders for a Python matching engine, and the engine's snapshot server.

``UdpSender`` and ``TcpSender`` number, seal (with the source's ``key``), pack and send events
(see ``ingest.framing``); ``heartbeat()`` says "alive, nothing to send" (call it when idle for
a second). ``serve_snapshots`` answers pushd's book requests from a callback.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import trio

from ingest import wire
from ingest.framing import Framer

BookProvider = Callable[[str, int, int], wire.BookSnapshot]  # (symbol, depth, request_id)


class UdpSender:
    def __init__(
        self, host: str, port: int, src: int, epoch: int | None = None, *,
        key: bytes | None = None,
    ) -> None:  # fmt: skip
        self._sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._addr = (host, port)
        self.framer = Framer(src, epoch, key)
        self.datagrams = 0

    async def send(self, events: Sequence[wire.Event]) -> None:
        for datagram in self.framer.datagrams(events):
            await self._sock.sendto(datagram, self._addr)
            self.datagrams += 1

    async def heartbeat(self) -> None:
        await self._sock.sendto(self.framer.heartbeat(), self._addr)
        self.datagrams += 1

    def close(self) -> None:
        self._sock.close()


class TcpSender:
    """One TCP connection to pushd; frames that cannot be sent are lost (pushd sees the gap).

    A new connection starts with a heartbeat: pushd drops a peer that has not authenticated
    (sent a valid frame) within ``ingest.auth_timeout_s``."""

    def __init__(
        self, host: str, port: int, src: int, epoch: int | None = None, *,
        key: bytes | None = None,
    ) -> None:  # fmt: skip
        self._host, self._port = host, port
        self._stream: trio.SocketStream | None = None
        self.framer = Framer(src, epoch, key)

    async def connect(self) -> None:
        stream = await trio.open_tcp_stream(self._host, self._port)
        self._stream = stream
        await self._send(stream, self.framer.tcp_frame([wire.Heartbeat()]))

    async def send(self, events: Sequence[wire.Event]) -> None:
        if self._stream is None:
            await self.connect()  # its hello is numbered before these events
        assert self._stream is not None
        await self._send(self._stream, self.framer.tcp_frame(events))

    async def heartbeat(self) -> None:
        if self._stream is None:
            await self.connect()  # its hello is the beat
        else:
            await self.send([wire.Heartbeat()])

    async def _send(self, stream: trio.SocketStream, frame: bytes) -> None:
        try:
            await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._stream = None
            raise

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None


async def serve_snapshots(
    provider: BookProvider,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``BookRequest`` frames with ``provider``'s snapshot; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handle(stream: trio.SocketStream) -> None:
        framer = Framer(src=0)
        decoder = wire.StreamDecoder()
        async with stream:
            try:
                while data := await stream.receive_some(1 << 16):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        answers: list[wire.Event] = [
                            provider(e.symbol, e.depth, e.request_id)
                            for e in frame.events
                            if isinstance(e, wire.BookRequest)
                        ]
                        if answers:
                            await stream.send_all(framer.tcp_frame(answers))
            except (trio.BrokenResourceError, wire.WireError):
                return

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)
