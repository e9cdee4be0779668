"""Trio senders for a Python matching engine, and the engine's snapshot server.

``UdpSender`` and ``TcpSender`` number, pack and send events (see ``ingest.framing``).
``serve_snapshots`` answers pushd's book requests from a callback.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import trio

from ingest import wire
from ingest.framing import Framer

BookProvider = Callable[[str, int, int], wire.BookSnapshot]  # (symbol, depth, request_id)


class UdpSender:
    def __init__(self, host: str, port: int, src: int, epoch: int | None = None) -> None:
        self._sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._addr = (host, port)
        self.framer = Framer(src, epoch)
        self.datagrams = 0

    async def send(self, events: Sequence[wire.Event]) -> None:
        for datagram in self.framer.datagrams(events):
            await self._sock.sendto(datagram, self._addr)
            self.datagrams += 1

    def close(self) -> None:
        self._sock.close()


class TcpSender:
    """One TCP connection to pushd; frames that cannot be sent are lost (pushd sees the gap)."""

    def __init__(self, host: str, port: int, src: int, epoch: int | None = None) -> None:
        self._host, self._port = host, port
        self._stream: trio.SocketStream | None = None
        self.framer = Framer(src, epoch)

    async def connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self._host, self._port)

    async def send(self, events: Sequence[wire.Event]) -> None:
        frame = self.framer.tcp_frame(events)
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        try:
            await self._stream.send_all(frame)
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
