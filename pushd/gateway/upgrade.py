"""The upgrade request, read by a C parser when it is plainly valid. No I/O.

h11 and wsproto read a WebSocket upgrade request in pure Python: about a third of what a
connect cost pushd (BENCHMARKS.md, issue 22). ``Upgrade.parse`` reads it with ``httptools``
(llhttp) instead, but only a request that h11 and wsproto would accept without a doubt: one
read holding the whole request and nothing after it, ``GET`` over HTTP/1.1, one ``Host``, no
body, every header name a token and every value plain visible ASCII, and wsproto's own checks
(``Connection: upgrade``, ``Upgrade: websocket``, version 13, a key). Anything else -- a
request in pieces, an unusual byte, a refusal -- goes to wsproto's ``H11Handshake`` with the
same bytes, so what is refused, and how, is exactly what it was.
"""

from __future__ import annotations

import re

import httptools
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import generate_accept_token, split_comma_header

from pushd.gateway.admission import Refusal, answer

MAX_REQUEST_BYTES = 16384  # h11's max_incomplete_event_size: a longer request is h11's to refuse
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a field name
_PLAIN = re.compile(rb"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # no tab, no obs-text, trimmed
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form
_ONCE = frozenset({b"host", b"connection", b"upgrade", b"sec-websocket-key",
                   b"sec-websocket-version"})  # fmt: skip
_BODY = frozenset({b"content-length", b"transfer-encoding"})
ACCEPTED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)  # wsproto's answer to AcceptConnection(), byte for byte (tests/test_upgrade.py)


class _Parsed:
    """httptools' callbacks: the target and the headers as they come."""

    __slots__ = ("headers", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _plain_request(data: bytes) -> tuple[Request, bytes] | None:
    """The request in ``data`` and its key if it is plainly valid (the module's docstring),
    else None."""
    if (
        len(data) > MAX_REQUEST_BYTES
        or not data.startswith(b"GET /")  # (llhttp skips empty lines before it; h11 does not)
        or data.find(b"\r\n\r\n") != len(data) - 4
    ):
        return None  # in pieces, too long, or more after it: wsproto's to read
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    if parser.get_method() != b"GET" or parser.get_http_version() != "1.1":
        return None
    target = parsed.target
    if not _TARGET.fullmatch(target) or not data.startswith(b"GET %s HTTP/1.1\r\n" % target):
        return None  # (llhttp takes more spaces in the request line; h11 does not)
    seen: set[bytes] = set()
    headers: list[tuple[bytes, bytes]] = []
    host = connection = upgrade = key = version = None
    extensions: list[str] = []
    subprotocols: list[str] = []
    for raw_name, value in parsed.headers:
        if not _TOKEN.fullmatch(raw_name) or not _PLAIN.fullmatch(value):
            return None
        name = raw_name.lower()
        if name in _BODY or (name in _ONCE and name in seen):
            return None
        seen.add(name)
        if name == b"host":
            host = value
            continue
        if name == b"sec-websocket-extensions":
            extensions.extend(split_comma_header(value))
            continue
        if name == b"sec-websocket-protocol":
            subprotocols.extend(split_comma_header(value))
            continue
        if name == b"connection":
            connection = value
        elif name == b"upgrade":
            upgrade = value
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        headers.append((name, value))
    if (
        host is None
        or key is None
        or version != b"13"
        or upgrade is None
        or upgrade.lower() != b"websocket"
        or connection is None
        or not any(token.lower() == "upgrade" for token in split_comma_header(connection))
    ):
        return None
    try:
        host_name = host.decode("idna")
    except UnicodeError:
        return None
    return Request(
        host=host_name, target=target.decode("ascii"), extensions=extensions,
        extra_headers=headers, subprotocols=subprotocols,
    ), key  # fmt: skip


class Upgrade:
    """One connection's upgrade request: read by httptools, or by wsproto's H11Handshake."""

    __slots__ = ("_handshake", "_key", "_raw", "request")

    def __init__(self) -> None:
        self.request: Request | None = None
        self._raw = b""  # what the fast path read (replayed to wsproto for a refusal)
        self._key = b""
        self._handshake: H11Handshake | None = None

    @property
    def by_httptools(self) -> bool:
        """The request was read by the fast path (no h11 ran)."""
        return self.request is not None and self._handshake is None

    def receive(self, data: bytes) -> Request | None:
        """Bytes of the request; the request once complete. Raises what h11 and wsproto raise
        for a request they cannot take (``admission.malformed`` answers it)."""
        if self._handshake is None and not self._raw and (fast := _plain_request(data)):
            self._raw = data
            self.request, self._key = fast
            return self.request
        handshake = self._wsproto()
        handshake.receive_data(data)
        for event in handshake.events():
            if isinstance(event, Request):
                self.request = event
                return event
        return None

    def _wsproto(self) -> H11Handshake:
        """wsproto's handshake, fed the fast path's bytes if it read them."""
        if self._handshake is None:
            self._handshake = H11Handshake(ConnectionType.SERVER)
            if self._raw:
                self._handshake.receive_data(self._raw)
                for _ in self._handshake.events():
                    pass
        return self._handshake

    def accept(self) -> tuple[bytes, WsConnection]:
        """The 101 answer and the open WebSocket."""
        if self._handshake is None:
            return ACCEPTED % generate_accept_token(self._key), WsConnection(ConnectionType.SERVER)
        data = self._handshake.send(AcceptConnection())
        ws = self._handshake.connection
        assert ws is not None
        return data, ws

    def refuse(self, refusal: Refusal) -> bytes:
        """The HTTP answer that refuses it (``admission.answer``)."""
        return answer(self._wsproto(), refusal)
