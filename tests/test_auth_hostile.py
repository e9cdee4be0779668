"""The HTTP login verifier under a burst of bad tokens (issue 18, item 15), against a real
login server that the test starts, kills and restarts on the same port.

Before: the burst filled httpx's pool, every verification that waited for it ended as "login
service unavailable" (error 11) -- not a failed login, so the per-connection limit never
applied -- and when the endpoint restarted meanwhile, requests cancelled under contention
left connections in the pool that were never reclaimed (encode/httpcore#1093): every later
login was error 11 and no request reached the healthy endpoint until pushd restarted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio
from conftest import make_config, open_client, start_daemon
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pushd.auth import HttpVerifier
from pushd.errors import ErrorCode
from pushd.http.api import serve_http


class LoginServer:
    """The exchange's login endpoint: slow to refuse, quick to accept. Its first run binds a
    port the kernel picks; a restart binds the same one."""

    def __init__(self) -> None:
        self.port = 0
        self.calls = 0
        self.good_calls = 0
        self._scope: trio.CancelScope | None = None
        self.app = Starlette(routes=[Route("/login", self.login, methods=["POST"])])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/login"

    async def login(self, request: Request) -> JSONResponse:
        self.calls += 1
        body = await request.json()
        if body.get("token") == "good":
            self.good_calls += 1
            return JSONResponse({"uid": "1001"})
        await trio.sleep(0.3)  # a database lookup that finds nothing
        return JSONResponse({"error": "bad token"}, 401)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(
                    serve_http, self.app, "127.0.0.1", self.port, trio.Event()
                )
                task_status.started()

    def kill(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


class Replies:
    """Each attacker connection's reply codes, and a way to wait until they say something."""

    def __init__(self) -> None:
        self.tallies: list[dict[int, int]] = []
        self._changed = trio.Event()

    def add(self, tally: dict[int, int], code: int) -> None:
        tally[code] = tally.get(code, 0) + 1
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, test: Callable[[list[dict[int, int]]], bool]) -> None:
        while not test(self.tallies):
            await self._changed.wait()


async def bad_logins(url: str, replies: Replies) -> None:
    """One attacker's connection: bad tokens as fast as its replies come, until cancelled."""
    tally: dict[int, int] = {}
    replies.tallies.append(tally)
    async with open_client(url) as c:
        while True:
            await c.send({"op": "auth", "token": "bad"})
            with trio.fail_after(30):
                reply: dict[str, Any] = msgspec.json.decode(await c.ws.get_message())
            replies.add(tally, reply["code"])
            if reply["code"] == ErrorCode.AUTH_RATE_LIMITED:
                await trio.sleep(0.1)  # an attacker's pace once cut off


async def test_a_bad_token_burst_is_capped_counted_and_survives_an_endpoint_restart(
    nursery: trio.Nursery,
) -> None:
    server = LoginServer()
    await nursery.start(server.run)
    auth = {"kind": "http", "http": {"url": server.url, "timeout_s": 1.0, "cache_ttl_s": 0}}
    running = await start_daemon(
        nursery, make_config(auth=auth, websocket={"handshakes_per_second": 10_000})
    )
    first, second = Replies(), Replies()
    async with trio.open_nursery() as attackers:
        for _ in range(150):
            attackers.start_soon(bad_logins, running.ws_url, first)
        with trio.fail_after(30):  # every attacker is cut off by its connection's limit
            await first.until(
                lambda ts: len(ts) == 150 and all(ErrorCode.AUTH_RATE_LIMITED in t for t in ts)
            )
        # refusals, timeouts and "busy" all count: 5 tries, then error 9 (5 a minute after)
        tried = [sum(n for code, n in t.items() if code != ErrorCode.AUTH_RATE_LIMITED)
                 for t in first.tallies]  # fmt: skip
        assert max(tried) <= 7, sorted(tried)[-10:]
        for _ in range(150):  # a fresh wave, each with its 5 tries
            attackers.start_soon(bad_logins, running.ws_url, second)
        with trio.fail_after(30):
            await second.until(lambda ts: sum(sum(t.values()) for t in ts) >= 100)
        server.kill()  # the endpoint restarts in the middle of the burst
        await trio.sleep(0.5)
        await nursery.start(server.run)
        restarted = time.monotonic()
        attackers.cancel_scope.cancel()  # they vanish, their logins in flight
    verifier = running.daemon.verifier
    assert isinstance(verifier, HttpVerifier)
    with trio.fail_after(20):  # the vanished attackers' calls finish (each is shielded, bounded)
        await until_idle(verifier, running.daemon.config.auth.http.max_concurrent)
    # a healthy endpoint now: a good token logs in before its connection's failed-login
    # allowance is spent (an unavailable answer counts as a failed login); the old stuck pool
    # answered 11 to every try, whatever the wait
    allowance = running.daemon.config.limits.failed_login_burst
    codes: list[int] = []
    async with open_client(running.ws_url) as good:
        with trio.fail_after(20):
            for _ in range(allowance):
                reply = await good.call({"op": "auth", "token": "good"})
                if reply.get("uid") == "1001":
                    break
                codes.append(reply["code"])
    print(f"logged in {time.monotonic() - restarted:.2f} s after the restart, after {codes}")
    assert reply.get("uid") == "1001", codes
    assert set(codes) <= {ErrorCode.AUTH_UNAVAILABLE}, codes
    assert server.good_calls >= 1


async def until_idle(verifier: HttpVerifier, slots: int) -> None:
    """Every verification slot free at once: no call of the burst is still in flight."""
    taken = 0
    try:
        for _ in range(slots):
            await verifier._slots.acquire()
            taken += 1
    finally:
        for _ in range(taken):
            verifier._slots.release()
