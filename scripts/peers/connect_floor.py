#!/usr/bin/env python3
"""The least a Python server can do per connect + upgrade + subscribe: the floor of the storm.

Two servers that answer the storm client of scripts/bench.py and nothing else: the upgrade
request is searched for its key only, the 101 is a canned string, the subscribe frame is not
even unmasked, and the reply is a canned frame. ``trio`` is one task per connection on Trio's
sockets (what any Trio gateway pays before doing its own work); ``epoll`` is one
``select.epoll`` loop with no framework at all (what Python pays without Trio). Neither is a
WebSocket server: they only show how far below nchan the language and the loop already are.

    python scripts/peers/connect_floor.py trio|epoll PORT
"""

from __future__ import annotations

import base64
import hashlib
import select
import socket
import sys

import trio

ACCEPTED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REPLY = b'{"result":true,"id":1}'
REPLY_FRAME = bytes([0x81, len(REPLY)]) + REPLY


def accepted(request: bytes) -> bytes:
    start = request.index(b"Sec-WebSocket-Key:") + len(b"Sec-WebSocket-Key:")
    key = request[start : request.index(b"\r\n", start)].strip()
    return ACCEPTED % base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


async def trio_connection(sock: trio.socket.SocketType) -> None:
    with sock:
        request = b""
        while b"\r\n\r\n" not in request:
            data = await sock.recv(4096)
            if not data:
                return
            request += data
        await sock.send(accepted(request))
        if not await sock.recv(4096):  # the subscribe frame
            return
        await sock.send(REPLY_FRAME)
        while await sock.recv(4096):
            pass


async def trio_server(port: int) -> None:
    listener = trio.socket.from_stdlib_socket(listening(port))
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(trio_connection, sock)


def epoll_server(port: int) -> None:
    listener = listening(port)
    listener.setblocking(False)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}  # buffer: the request, then b"sub"
    while True:
        for fd, _ in poll.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    conns[sock.fileno()] = (sock, bytearray())
                    poll.register(sock.fileno(), select.EPOLLIN)
                continue
            sock, buffer = conns[fd]
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            if not data:
                poll.unregister(fd)
                sock.close()
                del conns[fd]
            elif buffer == b"sub":
                sock.send(REPLY_FRAME)
                buffer[:] = b"done"
            elif buffer != b"done":
                buffer += data
                if b"\r\n\r\n" in buffer:
                    sock.send(accepted(bytes(buffer)))
                    buffer[:] = b"sub"


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "trio":
        trio.run(trio_server, port)
    else:
        epoll_server(port)
