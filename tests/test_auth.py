"""Login verifiers: signed tokens, JWT, and the exchange's HTTP login endpoint (a real server)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio
from conftest import make_config, open_client, start_daemon
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pushd.auth import HmacVerifier, HttpVerifier, JwtVerifier, issue_hmac_token
from pushd.config import HmacAuthConfig, HttpAuthConfig, JwtAuthConfig
from pushd.errors import AuthError, AuthUnavailable, ErrorCode
from pushd.http.api import serve_http


async def test_hmac_tokens() -> None:
    verifier = HmacVerifier(HmacAuthConfig(secret="s1"))
    assert (await verifier.verify(issue_hmac_token("s1", "1001", 60))).uid == "1001"
    for token in (
        issue_hmac_token("s2", "1001", 60),  # other secret
        issue_hmac_token("s1", "1001", -1),  # expired
        issue_hmac_token("s1", "1001", 60)[:-2] + "xx",  # tampered
        "",
        "a.b.c",
    ):
        with pytest.raises(AuthError):
            await verifier.verify(token)
    with pytest.raises(AuthError):
        issue_hmac_token("s1", "user_1002", 60)  # not a valid uid


KEY = "jwt-key-" + "0123456789abcdef" * 4


async def test_jwt_tokens() -> None:
    verifier = JwtVerifier(JwtAuthConfig(key=KEY, audience="pushd"))
    exp = int(time.time()) + 60
    good = jwt.encode({"sub": "42", "exp": exp, "aud": "pushd"}, KEY, algorithm="HS256")
    assert (await verifier.verify(good)).uid == "42"
    bad = [
        jwt.encode({"sub": "42", "exp": exp, "aud": "pushd"}, KEY + "x", algorithm="HS256"),
        jwt.encode({"sub": "42", "exp": exp - 120, "aud": "pushd"}, KEY, algorithm="HS256"),
        jwt.encode({"sub": "42", "aud": "pushd"}, KEY, algorithm="HS256"),  # no exp
        jwt.encode({"sub": "42", "exp": exp, "aud": "other"}, KEY, algorithm="HS256"),
        jwt.encode({"exp": exp, "aud": "pushd"}, KEY, algorithm="HS256"),  # no uid
        jwt.encode({"sub": "4 2", "exp": exp, "aud": "pushd"}, KEY, algorithm="HS256"),
        jwt.encode({"sub": "42", "exp": exp, "aud": "pushd"}, KEY, algorithm="HS512"),
        "not-a-jwt",
    ]
    for token in bad:
        with pytest.raises(AuthError):
            await verifier.verify(token)


class LoginEndpoint:
    """The exchange's login endpoint, served for real: token -> uid."""

    def __init__(self) -> None:
        self.calls = 0
        self.mode = "ok"
        self.app = Starlette(routes=[Route("/login", self.login, methods=["POST"])])

    async def login(self, request: Request) -> JSONResponse:
        self.calls += 1
        body = await request.json()
        if self.mode == "slow":
            await trio.sleep(10)
        if self.mode == "down":
            return JSONResponse({"error": "boom"}, 502)
        if self.mode == "evil":
            return JSONResponse({"uid": "1002_balance"})
        if body.get("token") == "good":
            return JSONResponse({"uid": 1001})
        return JSONResponse({"error": "bad token"}, 401)


async def serve_endpoint(nursery: trio.Nursery) -> tuple[LoginEndpoint, str]:
    endpoint = LoginEndpoint()

    port = await nursery.start(serve_http, endpoint.app, "127.0.0.1", 0, trio.Event())
    return endpoint, f"http://127.0.0.1:{port}/login"


async def test_http_login_endpoint(nursery: trio.Nursery) -> None:
    endpoint, url = await serve_endpoint(nursery)
    verifier = HttpVerifier(HttpAuthConfig(url=url, timeout_s=0.5, cache_ttl_s=60))
    try:
        assert (await verifier.verify("good")).uid == "1001"
        assert (await verifier.verify("good")).uid == "1001"
        assert endpoint.calls == 1  # the second answer came from the cache
        with pytest.raises(AuthError) as refused:
            await verifier.verify("bad")
        assert not isinstance(refused.value, AuthUnavailable)
        for mode in ("down", "slow"):
            endpoint.mode = mode
            with pytest.raises(AuthUnavailable):
                await verifier.verify("other")
        endpoint.mode = "evil"
        with pytest.raises(AuthError):
            await verifier.verify("other2")
    finally:
        await verifier.aclose()


async def test_http_login_end_to_end(nursery: trio.Nursery) -> None:
    endpoint, url = await serve_endpoint(nursery)
    config = make_config(auth={"kind": "http", "http": {"url": url, "timeout_s": 0.5}})
    running = await start_daemon(nursery, config)
    async with open_client(running.ws_url) as c:
        assert (await c.call({"op": "auth", "token": "bad"}))["code"] == ErrorCode.AUTH_FAILED
        assert (await c.call({"op": "auth", "token": "good"}))["uid"] == "1001"
        endpoint.mode = "down"
        reply: dict[str, Any] = await c.call({"op": "auth", "token": "x"})
        assert reply["code"] == ErrorCode.AUTH_UNAVAILABLE
