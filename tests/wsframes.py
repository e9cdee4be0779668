"""A WebSocket client's bytes built by hand, for the hostile tests, the fuzz and the soak: what
wsproto would refuse to send (an empty continuation, a length the server must not believe, a
frame in odd states) is the point. Plain blocking sockets: the client side is deliberately dumb.

What the server sends back is read with wsproto's own frame decoder (``frames``,
``ServerFrames``, ``read_frame``): one parser for every test, and a strict one (a frame a
client must refuse raises ``ParseFailed``)."""

from __future__ import annotations

import socket
import ssl
import struct
import weakref
from collections import deque

from wsproto.frame_protocol import FrameDecoder, Opcode

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
MASK_KEY = b"\x37\xfa\x21\x3d"
ZERO_MASK = b"\0\0\0\0"  # legal, and leaves the payload as it is: cheap for large floods
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 mask: bool = True, length: int | None = None,
                 mask_key: bytes = MASK_KEY) -> bytes:  # fmt: skip
    """A client frame (RFC 6455 5.2), masked unless told otherwise; ``length`` may lie about
    the payload."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    if mask_key == ZERO_MASK:
        return head + mask_key + payload
    return head + mask_key + bytes(b ^ mask_key[i % 4] for i, b in enumerate(payload))


def ws_connect(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A socket past the upgrade (101) to ``/ws`` on loopback."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(UPGRADE)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {answer!r}")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(answer[:80].decode("latin-1"))
    return sock


ServerFrame = tuple[Opcode, bytes]  # a whole frame: its opcode and its payload in one piece


class ServerFrames:
    """wsproto's ``FrameDecoder`` over the bytes a server sends, fed as they are read: each
    frame once it is whole (the decoder hands out pieces of a long payload; they are joined)."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(client=True, extensions=[])
        self._pieces: list[bytes] = []
        self._opcode = Opcode.CONTINUATION  # the first piece's (later pieces say CONTINUATION)
        self.pending: deque[ServerFrame] = deque()  # fed, not taken yet (``read_frame``)

    def feed(self, data: bytes) -> list[ServerFrame]:
        """The frames ``data`` completed (also appended to ``pending``)."""
        self._decoder.receive_bytes(data)
        done: list[ServerFrame] = []
        while (frame := self._decoder.process_buffer()) is not None:
            assert isinstance(frame.payload, bytes)  # FrameDecoder leaves payloads raw
            if not self._pieces:
                self._opcode = frame.opcode
            self._pieces.append(frame.payload)
            if frame.frame_finished:
                done.append((self._opcode, b"".join(self._pieces)))
                self._pieces.clear()
        self.pending.extend(done)
        return done


def frames(data: bytes) -> list[ServerFrame]:
    """Every whole server frame in ``data`` (an unfinished one at its end is left out)."""
    return ServerFrames().feed(data)


def close_code(payload: bytes) -> int | None:
    """The code of a close frame's payload, or None when it carries none."""
    return int(struct.unpack(">H", payload[:2])[0]) if len(payload) >= 2 else None


_READERS: weakref.WeakKeyDictionary[socket.socket, ServerFrames] = weakref.WeakKeyDictionary()


def read_frame(sock: socket.socket) -> ServerFrame:
    """The next whole frame the server sent on ``sock``, blocking; what a read brought past it
    is kept (per socket) for the next call."""
    reader = _READERS.setdefault(sock, ServerFrames())
    while not reader.pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF")
        reader.feed(chunk)
    return reader.pending.popleft()
