"""One client's protocol state: who it is logged in as and what it is subscribed to. No I/O.

The gateway's connection shell owns a Session, asks it what a request means, and carries the
answer to the hub and the socket. All rules a user relies on live here, so they are tested
without sockets: the uid of a private channel is always the verified uid; a re-login as another
user drops the previous user's private subscriptions; a subscribe of several channels is all or
nothing; a login lasts as long as its token: ``limits.token_notice_s`` before the token's
``exp`` the client is told (``TokenNotice``), and at ``exp`` the session ends
(``TokenExpired``) unless a fresh token of the same user came meanwhile.
"""

from __future__ import annotations

from collections.abc import Container

import msgspec

from pushd.channels import Channel, resolve
from pushd.config import LimitsConfig
from pushd.errors import ErrorCode, RequestError
from pushd.gateway.ratelimit import TokenBucket


class TokenNotice(msgspec.Struct, frozen=True):
    """Tell the client its token expires in ``expires_in`` seconds (at ``exp``, Unix time)."""

    expires_in: float
    exp: float


class TokenExpired(msgspec.Struct, frozen=True):
    """The token's ``exp`` has passed with no fresh login: end the session."""


class Session:
    __slots__ = (
        "_failed_logins",
        "_limits",
        "_notice_at",
        "_requests",
        "_symbols",
        "_told",
        "expires_at",
        "subscriptions",
        "uid",
    )

    def __init__(self, symbols: Container[str], limits: LimitsConfig, now: float) -> None:
        self._symbols = symbols
        self._limits = limits
        self.uid: str | None = None
        self.expires_at: float | None = None  # the login's token's exp (Unix time)
        self._notice_at: float | None = None  # when to tell it
        self._told = False  # the client has been told of this exp
        self.subscriptions: dict[str, Channel] = {}  # internal name -> channel
        self._requests = TokenBucket(limits.messages_per_second, limits.message_burst, now)
        self._failed_logins = TokenBucket(
            limits.failed_logins_per_minute / 60.0, limits.failed_login_burst, now
        )

    def relimit(self, limits: LimitsConfig) -> None:
        """A reload's limits: request rate, login failures, subscriptions (the buffers' sizes
        stay what the connection opened with)."""
        self._limits = limits
        self._requests.retune(limits.messages_per_second, limits.message_burst)
        self._failed_logins.retune(
            limits.failed_logins_per_minute / 60.0, limits.failed_login_burst
        )

    def take_request(self, now: float) -> bool:
        """False when the client sends faster than allowed (abuse: the shell closes it)."""
        return self._requests.take(now)

    def check_login_allowed(self, now: float) -> None:
        if not self._failed_logins.has_token(now):
            raise RequestError(ErrorCode.AUTH_RATE_LIMITED)

    def login_failed(self, now: float) -> None:
        self._failed_logins.take(now)

    def login(self, uid: str, exp: float | None = None, now: float | None = None) -> list[Channel]:
        """Log in as ``uid`` with a token valid until ``exp`` (None: no end), at ``now`` (Unix
        time); returns the private subscriptions to drop (another user's). A fresh token
        extends the login. The notice comes ``token_notice_s`` before ``exp``, but not before
        half the token's remaining life has passed (a short token is not told at once)."""
        dropped: list[Channel] = []
        if self.uid is not None and self.uid != uid:
            dropped = [ch for ch in self.subscriptions.values() if ch.private]
            for channel in dropped:
                del self.subscriptions[channel.internal]
        self.uid = uid
        self.expires_at = exp
        self._told = False
        self._notice_at = None
        if exp is not None:
            self._notice_at = exp - self._limits.token_notice_s
            if now is not None:
                self._notice_at = max(self._notice_at, now + (exp - now) / 2)
        return dropped

    def token_check_at(self) -> float | None:
        """When ``token_due`` next has something to say (Unix time), or None: never."""
        if self.expires_at is None or self._notice_at is None:
            return None
        return self.expires_at if self._told else self._notice_at

    def token_due(self, now: float) -> TokenNotice | TokenExpired | None:
        """What the token's lifetime asks for at ``now``: a notice (once per token), the end
        of the session, or nothing yet."""
        exp, notice_at = self.expires_at, self._notice_at
        if exp is None or notice_at is None:
            return None
        if now >= exp:
            return TokenExpired()
        if not self._told and now >= notice_at:
            self._told = True
            return TokenNotice(expires_in=round(exp - now, 3), exp=exp)
        return None

    def subscribe(self, names: list[str]) -> list[Channel]:
        """Validate every name, then add them; returns only the channels that are new.

        Raises:
            RequestError: the first bad name, or TOO_MANY_SUBSCRIPTIONS; nothing is added.
        """
        new: dict[str, Channel] = {}
        for name in names:
            channel = resolve(name, self._symbols, self.uid)
            if channel.internal not in self.subscriptions:
                new[channel.internal] = channel
        if len(self.subscriptions) + len(new) > self._limits.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"too many subscriptions (at most {self._limits.max_subscriptions})",
            )
        self.subscriptions.update(new)
        return list(new.values())

    def unsubscribe_all(self) -> list[str]:
        """Leave every channel (the connection ends); returns their internal names."""
        internals = list(self.subscriptions)
        self.subscriptions.clear()
        return internals

    def unsubscribe(self, names: list[str]) -> list[Channel]:
        """Validate every name, then remove them; returns the channels that were subscribed."""
        channels = [resolve(name, self._symbols, self.uid) for name in names]
        removed = []
        for channel in channels:
            if self.subscriptions.pop(channel.internal, None) is not None:
                removed.append(channel)
        return removed
