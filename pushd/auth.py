"""Login: turn a client's token into a verified uid, through a pluggable verifier.

- ``hmac``: tokens signed with a shared secret (itsdangerous) carrying uid and expiry; issued by
  ``pushd token --uid 1001`` or by the exchange's backend with the same secret.
- ``jwt``: JSON Web Tokens (PyJWT); the uid is a configured claim (``sub`` by default).
- ``http``: the request's design: POST the token to the exchange's login endpoint, which answers
  the uid. Answers are cached for a short while; the call has a timeout; at most
  ``max_concurrent`` calls are in flight on the node (a burst of bad tokens waits for a slot,
  or is answered "unavailable", and never grows the pool).

Every verifier returns a uid that matches ``UID_PATTERN`` or raises ``AuthError``, so a login
backend can never make a uid that names someone else's internal channel.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

import httpx
import itsdangerous
import jwt
import msgspec
import trio

from pushd.channels import UID_PATTERN
from pushd.config import AuthConfig, HmacAuthConfig, HttpAuthConfig, JwtAuthConfig
from pushd.errors import AuthError, AuthUnavailable

_HMAC_SALT = "pushd-auth"


class Login(msgspec.Struct, frozen=True):
    """What a token proves: a uid, until ``exp`` (Unix time; None: the token has no end)."""

    uid: str
    exp: float | None = None


class Verifier(Protocol):
    async def verify(self, token: str) -> Login:
        """The login the token proves; raises AuthError (or AuthUnavailable)."""
        ...

    async def aclose(self) -> None: ...


def _checked_uid(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not UID_PATTERN.fullmatch(value):
        raise AuthError(f"token names an invalid uid: {value!r}"[:120])
    return value


class _HmacClaims(msgspec.Struct, frozen=True):
    uid: str
    exp: float


def issue_hmac_token(secret: str, uid: str, ttl_s: float, now: float | None = None) -> str:
    """A token for ``uid`` valid for ``ttl_s`` seconds, verifiable by ``HmacVerifier``."""
    uid = _checked_uid(uid)
    exp = (time.time() if now is None else now) + ttl_s
    serializer = itsdangerous.URLSafeSerializer(secret, salt=_HMAC_SALT)
    return str(serializer.dumps(msgspec.to_builtins(_HmacClaims(uid=uid, exp=exp))))


class HmacVerifier:
    def __init__(self, config: HmacAuthConfig) -> None:
        if not config.secret:
            raise ValueError("auth.hmac.secret is empty")
        self._serializer = itsdangerous.URLSafeSerializer(config.secret, salt=_HMAC_SALT)

    async def verify(self, token: str) -> Login:
        try:
            claims = msgspec.convert(self._serializer.loads(token), _HmacClaims)
        except (itsdangerous.BadData, msgspec.ValidationError) as exc:
            raise AuthError(f"bad token: {type(exc).__name__}") from None
        if claims.exp < time.time():
            raise AuthError("token expired")
        return Login(_checked_uid(claims.uid), claims.exp)

    async def aclose(self) -> None:
        pass


class JwtVerifier:
    def __init__(self, config: JwtAuthConfig) -> None:
        self._config = config

    async def verify(self, token: str) -> Login:
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                cfg.key,
                algorithms=cfg.algorithms,
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", cfg.uid_claim]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"bad token: {type(exc).__name__}") from None
        exp = claims.get("exp")
        exp = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        return Login(_checked_uid(claims.get(cfg.uid_claim)), exp)

    async def aclose(self) -> None:
        pass


class HttpVerifier:
    """POST ``{"token": ...}`` to the login endpoint; a 200 JSON answer carries the uid.

    httpcore's pool must never see a cancellation from outside: a request cancelled between
    getting a new connection and using it leaves that connection in the pool for good
    (encode/httpcore#1093; a burst of logins from clients that went away filled the pool with
    them, and every later login was "unavailable" until a restart). So each call runs
    shielded, bounded by httpx's own timeouts and a deadline; at most ``max_concurrent`` run
    at once, as many as the pool has connections, so no request ever queues in the pool; and
    a pool that times out anyway, or a call past its deadline, replaces the client.
    """

    def __init__(self, config: HttpAuthConfig) -> None:
        self._config = config
        self._slots = trio.Semaphore(config.max_concurrent)
        self._client = self._new_client()
        self._cache: OrderedDict[str, tuple[Login, float]] = OrderedDict()
        self.replaced = 0  # clients replaced after a pool timeout or a missed deadline

    def _new_client(self) -> httpx.AsyncClient:
        size = self._config.max_concurrent
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        return httpx.AsyncClient(timeout=self._config.timeout_s, limits=limits)

    async def verify(self, token: str) -> Login:
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(token)
            if cached[0].exp is not None and cached[0].exp <= time.time():
                raise AuthError("token expired")
            return cached[0]
        with trio.move_on_after(self._config.timeout_s) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise AuthUnavailable("login endpoint busy: no verification slot")
        try:
            response = await self._post(token)
        finally:
            self._slots.release()
        if response.status_code >= 500:
            raise AuthUnavailable(f"login endpoint answered {response.status_code}")
        if response.status_code != 200:
            raise AuthError(f"login endpoint refused the token ({response.status_code})")
        try:
            body = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError):
            raise AuthUnavailable("login endpoint answered malformed JSON") from None
        if not isinstance(body, dict):
            raise AuthUnavailable("login endpoint answered no JSON object")
        login = Login(_checked_uid(body.get(self._config.uid_field)), self.exp_of(body))
        if login.exp is not None and login.exp <= time.time():
            raise AuthError("login endpoint answered an expired token")
        if self._config.cache_ttl_s > 0:
            self._cache[token] = (login, now + self._config.cache_ttl_s)
            while len(self._cache) > self._config.cache_size:
                self._cache.popitem(last=False)
        return login

    def exp_of(self, body: dict[str, object]) -> float | None:
        """The token's expiry in the endpoint's answer (Unix seconds), if it gives one."""
        exp = body.get(self._config.exp_field)
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return float(exp)
        return None

    async def _post(self, token: str) -> httpx.Response:
        client = self._client
        deadline_s = 4 * self._config.timeout_s  # pool, connect, write and read timeouts
        with trio.CancelScope(shield=True):
            with trio.move_on_after(deadline_s):
                try:
                    return await client.post(self._config.url, json={"token": token})
                except httpx.PoolTimeout:
                    await self._replace(client)
                    raise AuthUnavailable("login endpoint: PoolTimeout") from None
                except httpx.HTTPError as exc:
                    raise AuthUnavailable(f"login endpoint: {type(exc).__name__}") from None
            await self._replace(client)
        raise AuthUnavailable(f"login endpoint: no answer in {deadline_s} s")

    async def _replace(self, client: httpx.AsyncClient) -> None:
        """A pool that may hold connections nobody will release: start a fresh one."""
        if client is not self._client:
            return  # another call replaced it already
        self._client = self._new_client()
        self.replaced += 1
        with trio.CancelScope(shield=True), trio.move_on_after(self._config.timeout_s):
            await client.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


def make_verifier(config: AuthConfig) -> Verifier:
    if config.kind == "jwt":
        return JwtVerifier(config.jwt)
    if config.kind == "http":
        return HttpVerifier(config.http)
    return HmacVerifier(config.hmac)
