"""Every error a client can see, defined once.

Two kinds reach a client:

- ``ErrorCode``: the reply ``{"code": N, "msg": "..."}`` to one request. The connection stays
  open; the client fixes the request and goes on.
- ``CloseCode``: the WebSocket close code when the gateway ends a connection (abuse, shutdown,
  slow consumer, kicked by the operator). The client reconnects, or not, by the code.

``docs/protocol.md`` carries the same tables for API users; a test keeps them in step.

Exceptions::

    PushdError
    ├── RequestError      a client request is wrong; carries an ErrorCode (connection survives)
    ├── AuthError         a token was refused (bad signature, expired, unknown user)
    │   └── AuthUnavailable   the login backend could not answer (timeout, 5xx)
    ├── ConfigError       the configuration is invalid; the message names the key
    ├── ServiceError      a service of the daemon cannot run (its port is taken, ...)
    ├── ApiError          an HTTP API request is refused; carries the HTTP status
    ├── BusUnavailable    the bus could not answer (Redis unreachable); the request may be retried
    ├── MalformedData     message data that is not one JSON value in UTF-8 (also a ValueError)
    ├── EngineUnavailable the matching engine's snapshot service did not answer a book request
    ├── TlsClosed         a client's TLS is broken (bad record, failed handshake) or it closed
    ├── FollowError       an event the follow table has no row for: a bug (also a RuntimeError)
    ├── LinkDead          a Redis connection did not answer pushd's PING in time
    ├── PeerGone          a client reset its connection while it was written
    ├── LocalStateError   the gateway tried a move its phase tables forbid: a bug
    └── BinanceError      a request to the Binance surface is refused: Binance's code and msg
        └── InvalidStream     a stream name the Binance surface does not serve

Each is raised where its module says (``pushd.http.api``, ``pushd.bus``, ``pushd.feed.poller``,
``pushd.tls``, ``pushd.bus.follow``, ``pushd.bus.link``, ``pushd.gateway``, ``pushd.binance``);
those modules import
it from here.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Numeric codes of error replies; ``DEFAULT_MESSAGES`` gives their text."""

    INTERNAL = 1
    MALFORMED_JSON = 2
    INVALID_REQUEST = 3
    UNKNOWN_OP = 4
    UNKNOWN_CHANNEL = 5
    UNKNOWN_SYMBOL = 6
    LOGIN_REQUIRED = 7
    AUTH_FAILED = 8
    AUTH_RATE_LIMITED = 9
    TOO_MANY_SUBSCRIPTIONS = 10
    AUTH_UNAVAILABLE = 11
    BINARY_NOT_SUPPORTED = 12
    UNAVAILABLE = 13


DEFAULT_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "internal error",
    ErrorCode.MALFORMED_JSON: "malformed JSON",
    ErrorCode.INVALID_REQUEST: "invalid request",
    ErrorCode.UNKNOWN_OP: "unknown op",
    ErrorCode.UNKNOWN_CHANNEL: "unknown channel",
    ErrorCode.UNKNOWN_SYMBOL: "unknown symbol",
    ErrorCode.LOGIN_REQUIRED: "login required for private channels",
    ErrorCode.AUTH_FAILED: "authentication failed",
    ErrorCode.AUTH_RATE_LIMITED: "too many failed logins, retry later",
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: "too many subscriptions",
    ErrorCode.AUTH_UNAVAILABLE: "login service unavailable, retry later",
    ErrorCode.BINARY_NOT_SUPPORTED: "binary frames are not supported, send JSON text",
    ErrorCode.UNAVAILABLE: "the message bus is unreachable, retry later",
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends (RFC 6455 ones and 4000-4999 of its own)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect to another node
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    RATE_LIMITED = 4001  # client sent requests faster than allowed
    SLOW_CONSUMER = 4002  # outbound buffer overflowed on a private stream or stalled
    KICKED = 4003  # disconnected by the operator (publish API)
    POLICY_VIOLATION = 1008  # a message not finished within limits.message_timeout_s
    TOKEN_EXPIRED = 4004  # the login's token reached its exp with no fresh auth


class PushdError(Exception):
    """Root of pushd's own exceptions."""


class RequestError(PushdError):
    """A client request could not be served; the reply says why."""

    def __init__(self, code: ErrorCode, msg: str | None = None) -> None:
        self.code = code
        self.msg = msg if msg is not None else DEFAULT_MESSAGES[code]
        self.request_id: int | str | None = None  # echoed in the reply when the client sent one
        super().__init__(f"{int(code)}: {self.msg}")


class AuthError(PushdError):
    """The token was refused; the message is safe to log but not shown to the client."""


class AuthUnavailable(AuthError):
    """The login backend did not answer in time or failed; the token may be fine."""


class ConfigError(PushdError):
    """Invalid configuration; ``str(exc)`` is the one line an operator reads: control
    characters (from a key, a value or a file name) are escaped, never printed."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class ServiceError(PushdError):
    """A service cannot start (cannot bind its address); ``str(exc)`` names it and the port."""


class ApiError(PushdError):
    """An HTTP API request is refused: ``status`` is the HTTP status, ``msg`` the reason."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class BusUnavailable(PushdError):
    """The bus could not answer (the broker is unreachable); the request may be retried."""


class MalformedData(PushdError, ValueError):
    """Message data that is not one JSON value in UTF-8: no client could be sent it."""


class EngineUnavailable(PushdError):
    """The matching engine's snapshot service closed the connection or answered nothing."""


class TlsClosed(PushdError):
    """The peer's TLS is broken (bad record, failed handshake) or it sent close_notify."""


class FollowError(PushdError, RuntimeError):
    """An event the follow table has no row for: a bug in whoever sent it."""


class LinkDead(PushdError):
    """A Redis connection did not answer a PING in time: the bus replaces it."""


class PeerGone(PushdError):
    """The peer reset the connection while it was written: that connection ends, quietly."""


class LocalStateError(PushdError):
    """The gateway tried a move its tables do not allow (a write in a wrong phase, ...)."""


class BinanceError(PushdError):
    """A request to the Binance surface is refused, in Binance's terms: ``code`` and ``msg``
    (a WebSocket request's nested error, or a REST answer's body with HTTP ``status``)."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


class InvalidStream(BinanceError):
    """A stream name the Binance surface does not serve (code 2, invalid request)."""

    def __init__(self, msg: str) -> None:
        super().__init__(2, f"Invalid request: {msg}")
