"""Who gets in: sockets at accept, upgrade requests at the handshake. No I/O.

``Admission`` reads the *current* ``[websocket]`` config on every accept and every request, so
a reload's limits hold for the next socket (``reconfigure``). Two gates:

- at accept, a socket far past a limit (``max_connections`` + 64 sockets, or
  ``max_connections_per_ip`` + ``PER_IP_FLOOD`` from one address) is closed unanswered: under a
  storm not even a handshake is spent on it;
- at the upgrade request, the answer is an HTTP refusal with a reason (``Refusal``): shutting
  down, unknown path, origin, per-IP cap (429), capacity and handshake rate (503). A request
  wsproto finds malformed is answered as it suggests (``event_hint``): 400, or 426 with
  ``Sec-WebSocket-Version: 13`` for a version it does not speak (RFC 6455 section 4.4).

Accept errors fall in trio's three classes (``accept_error``): the connection died before it
was taken (ignored), the process is out of a resource (pause, then go on), the listener itself
is closed (a bug: raised, as trio does). Anything else is logged and paused after like a
resource, so an error that persists never spins the loop.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

from wsproto.events import RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from pushd.config import WebSocketConfig
from pushd.gateway.ratelimit import TokenBucket

PER_IP_FLOOD = 16  # sockets over max_connections_per_ip that are still answered (429)
SOCKETS_OVER = 64  # sockets over max_connections that are still answered (503)


class AcceptError(enum.Enum):
    """trio's classes of ``accept`` errors (``trio._highlevel_socket``, ``serve_listeners``)."""

    GONE = "gone"  # the peer went away before it was taken: take the next one
    CAPACITY = "capacity"  # out of file descriptors or memory: pause, then go on
    CLOSED = "closed"  # the listener is closed under us: a bug, raised
    OTHER = "other"  # anything else: logged, then pause (it may persist)


_GONE = {
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
}  # fmt: skip
_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_CLOSED = {errno.EBADF, errno.ENOTSOCK}


def accept_error(code: int | None) -> AcceptError:
    if code in _GONE:
        return AcceptError.GONE
    if code in _CAPACITY:
        return AcceptError.CAPACITY
    if code in _CLOSED:
        return AcceptError.CLOSED
    return AcceptError.OTHER


class Refusal(NamedTuple):
    """An upgrade request answered with HTTP instead of a WebSocket."""

    status: int
    label: str  # pushd_handshakes_rejected{reason=...}
    text: str  # the body: what the client is told
    headers: tuple[tuple[bytes, bytes], ...] = ()


TIMED_OUT = Refusal(408, "handshake_timeout", "")  # no request in time: closed unanswered
TLS = Refusal(400, "tls", "")  # broken TLS, or the peer left during it: closed unanswered
SHUTTING_DOWN = Refusal(503, "shutting_down", "server shutting down, try another node")
ORIGIN = Refusal(403, "origin", "origin not allowed")
PER_IP = Refusal(429, "per_ip", "too many connections from your address")
CAPACITY = Refusal(503, "capacity", "server full, try another node")
HANDSHAKE_RATE = Refusal(503, "handshake_rate", "too many connection attempts, retry in a second")


def malformed(exc: Exception) -> Refusal:
    """The answer to a request h11 or wsproto could not take: what wsproto's ``event_hint``
    suggests (426 and the version it speaks, for a wrong ``Sec-WebSocket-Version``), else 400."""
    text = f"bad WebSocket handshake: {exc}"[:200]
    hint = exc.event_hint if isinstance(exc, RemoteProtocolError) else None
    if isinstance(hint, RejectConnection) and hint.status_code != 400:
        return Refusal(hint.status_code, "bad_handshake", text, tuple(hint.headers))
    return Refusal(400, "bad_handshake", text)


def answer(handshake: H11Handshake, refusal: Refusal) -> bytes:
    """The HTTP response that refuses a request (with ``retry-after`` for 429 and 503)."""
    body = refusal.text.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    headers += refusal.headers
    if refusal.status in (429, 503):
        headers.append((b"retry-after", b"1"))
    try:
        data = handshake.send(
            RejectConnection(status_code=refusal.status, headers=headers, has_body=True)
        )
        return data + handshake.send(RejectData(data=body))
    except Exception:  # the request was too broken for h11 to answer it: plain 400
        data = b"HTTP/1.1 %d Bad Request\r\nconnection: close\r\ncontent-length: %d\r\n" % (
            refusal.status, len(body))  # fmt: skip
        return data + b"content-type: text/plain\r\n\r\n" + body


class Admission:
    """The node's sockets by address and its handshake rate, against the current config."""

    __slots__ = ("_accepts", "_config", "_handshakes", "open_sockets", "per_ip")

    def __init__(
        self, config: WebSocketConfig, accepts: Callable[[str], bool] | None = None
    ) -> None:
        self._config = config
        self._accepts = accepts  # which paths are served (None: ``config.paths``)
        rate = config.handshakes_per_second
        self._handshakes = TokenBucket(rate, max(1, int(rate)), 0.0)
        self.open_sockets = 0
        self.per_ip: dict[str, int] = {}

    def reconfigure(self, config: WebSocketConfig) -> None:
        """A reload: the next accept and the next request see the new limits."""
        self._config = config
        rate = config.handshakes_per_second
        self._handshakes.retune(rate, max(1, int(rate)))

    def take_socket(self, ip: str) -> str | None:
        """Count a socket just accepted from ``ip`` in; or, far past a limit, the reason it is
        closed unanswered (``capacity``, ``per_ip_flood``) and not counted."""
        config = self._config
        if self.open_sockets >= config.max_connections + SOCKETS_OVER:
            return "capacity"
        if self.per_ip.get(ip, 0) >= config.max_connections_per_ip + PER_IP_FLOOD:
            return "per_ip_flood"
        self.open_sockets += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """A socket taken in by ``take_socket`` is closed."""
        self.open_sockets -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def refusal(
        self, request: Request, ip: str, connections: int, stopping: bool, now: float
    ) -> Refusal | None:
        """Why an upgrade request from ``ip`` is refused while ``connections`` are open, or
        None: it is accepted (and takes a token of the handshake rate)."""
        config = self._config
        if stopping:
            return SHUTTING_DOWN
        path = urlsplit(request.target).path
        if not (path in config.paths if self._accepts is None else self._accepts(path)):
            return Refusal(404, "not_found", f"no WebSocket at {path}"[:200])
        origin = next((v for k, v in request.extra_headers if k.lower() == b"origin"), None)
        if (
            config.allowed_origins
            and origin is not None
            and origin.decode("latin-1") not in config.allowed_origins
        ):
            return ORIGIN
        if self.per_ip.get(ip, 0) > config.max_connections_per_ip:
            return PER_IP
        if connections >= config.max_connections:
            return CAPACITY
        if not self._handshakes.take(now):
            return HANDSHAKE_RATE
        return None
