"""A session does not outlive its token (issue 18, item 14): told ``limits.token_notice_s``
before ``exp`` (an ``@auth`` event), closed with 4004 at ``exp`` unless it logged in again
with a fresh token of the same user. Sans-IO with a fake clock, then a real daemon and a real
token that expires."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio
import trio_websocket
from conftest import SECRET, RawClient, make_config, open_client, start_daemon
from test_session import make

from pushd.auth import HmacVerifier, HttpVerifier, issue_hmac_token
from pushd.config import HmacAuthConfig, HttpAuthConfig
from pushd.errors import CloseCode
from pushd.gateway import lifecycle
from pushd.gateway.requests import MAX_EMPTIED
from pushd.gateway.session import TokenExpired, TokenNotice


def test_a_session_is_told_before_exp_and_expires_at_it() -> None:
    s = make(token_notice_s=30)
    s.login("1001", exp=1000.0)
    assert s.token_check_at() == 970.0
    assert s.token_due(969.9) is None
    assert s.token_due(970.0) == TokenNotice(expires_in=30.0, exp=1000.0)
    assert s.token_due(980.0) is None  # told once
    assert s.token_check_at() == 1000.0
    assert s.token_due(1000.0) == TokenExpired()


def test_a_fresh_token_of_the_same_user_extends_the_session() -> None:
    s = make(token_notice_s=30)
    s.login("1001", exp=1000.0)
    s.subscribe(["@order"])
    assert s.token_due(975.0) == TokenNotice(expires_in=25.0, exp=1000.0)
    assert s.login("1001", exp=2000.0) == []  # private streams kept
    assert s.token_due(1000.0) is None and s.token_check_at() == 1970.0
    assert s.token_due(1971.0) == TokenNotice(expires_in=29.0, exp=2000.0)  # told again
    assert s.token_due(2000.5) == TokenExpired()
    assert list(s.subscriptions) == ["user_1001_order"]


def test_a_token_without_exp_never_expires_and_one_with_exp_is_told_before_it() -> None:
    s = make(token_notice_s=30)
    s.login("1001")
    assert s.token_check_at() is None and s.token_due(1e12) is None
    s.login("1001", exp=100.0)
    assert s.token_due(90.0) == TokenNotice(expires_in=10.0, exp=100.0)
    s.login("1002", exp=None)  # another user's token without exp: nothing left to expire
    assert s.token_check_at() is None


def test_a_short_token_is_told_at_half_its_life_not_at_once() -> None:
    s = make(token_notice_s=60)
    s.login("1001", exp=1060.0, now=1000.0)  # a 60 s token: told after 30 s, not at login
    assert s.token_due(1000.0) is None and s.token_check_at() == 1030.0
    assert s.token_due(1030.0) == TokenNotice(expires_in=30.0, exp=1060.0)
    s.login("1001", exp=5000.0, now=1040.0)  # a long one: 60 s before its exp
    assert s.token_check_at() == 4940.0


async def test_verifiers_say_when_a_token_expires() -> None:
    verifier = HmacVerifier(HmacAuthConfig(secret="s1"))
    login = await verifier.verify(issue_hmac_token("s1", "1001", 60, now=time.time()))
    assert login.uid == "1001" and login.exp is not None
    assert abs(login.exp - (time.time() + 60)) < 5
    assert HttpVerifier(HttpAuthConfig(url="http://127.0.0.1:1/")).exp_of({"exp": 7}) == 7.0
    assert HttpVerifier(HttpAuthConfig(url="http://127.0.0.1:1/")).exp_of({}) is None


async def receive(c: Any) -> Any:
    """The next message, however long it takes (the test's own deadline bounds it)."""
    return msgspec.json.decode(await c.ws.get_message())


async def closed_with(c: Any, code: CloseCode, what: str) -> None:
    """The client's next news is its close with ``code``: any message first fails, ``what``
    saying what it means."""
    try:
        message = await receive(c)
    except trio_websocket.ConnectionClosed as closed:
        assert closed.reason is not None
        assert closed.reason.code == code
    else:
        raise AssertionError(f"{what}: {message}")


async def test_a_session_outlives_no_real_token_and_a_fresh_token_extends_it(
    nursery: trio.Nursery,
) -> None:
    running = await start_daemon(nursery, make_config(limits={"token_notice_s": 1.0}))
    ttl = 2.5
    async with open_client(running.ws_url) as stale, open_client(running.ws_url) as fresh:
        for c in (stale, fresh):
            token = issue_hmac_token(SECRET, "1001", ttl)
            assert (await c.call({"op": "auth", "token": token}))["uid"] == "1001"
            assert (await c.call({"op": "subscribe", "channel": "@order"}))["result"] is True
        logged_in = time.time()
        with trio.fail_after(ttl + 3):
            notice = await receive(fresh)
            assert notice["event"] == "@auth" and 0 < notice["data"]["expiresIn"] <= 1.0
            token = issue_hmac_token(SECRET, "1001", 10)
            await fresh.send({"op": "auth", "token": token, "id": 7})
            assert (await receive(fresh)) == {"result": True, "id": 7, "uid": "1001"}
            notice = await receive(stale)
            assert notice["event"] == "@auth"
            await closed_with(
                stale, CloseCode.TOKEN_EXPIRED, "the stale session got more than its notice"
            )
        assert time.time() - logged_in >= ttl - 0.1  # not before its exp
        seq = await running.publish("user_1001_order", {"after": "exp"})
        event = await receive(fresh)  # the extended session goes on past the first exp
        assert (event["event"], event["seq"]) == ("@order", seq)


async def test_a_shorter_token_later_shortens_the_session(nursery: trio.Nursery) -> None:
    """The timer follows the latest login's exp: a session that logged in with a long token
    and then with a short one (another user's) is told and closed at the short one's exp,
    not at the first token's."""
    running = await start_daemon(nursery, make_config(limits={"token_notice_s": 1.0}))
    ttl = 2.5
    async with open_client(running.ws_url) as c:
        long_token = issue_hmac_token(SECRET, "1001", 600)
        assert (await c.call({"op": "auth", "token": long_token}))["uid"] == "1001"
        short_token = issue_hmac_token(SECRET, "1002", ttl)
        assert (await c.call({"op": "auth", "token": short_token}))["uid"] == "1002"
        assert (await c.call({"op": "subscribe", "channel": "@order"}))["result"] is True
        with trio.fail_after(ttl + 3):  # the long token's timer would sleep ~600 s
            notice = await receive(c)
            assert notice["event"] == "@auth" and 0 < notice["data"]["expiresIn"] <= ttl
            await closed_with(c, CloseCode.TOKEN_EXPIRED, "the session went on past its exp")


async def test_a_logged_in_connection_holds_no_task_for_its_token(nursery: trio.Nursery) -> None:
    """The tokens' lifetimes run in one task of the gateway: a login with an ``exp`` adds no
    task to its connection (a task per login cost every logged-in connection a task)."""
    running = await start_daemon(nursery, make_config(limits={"token_notice_s": 1.0}))
    async with open_client(running.ws_url) as c:
        token = issue_hmac_token(SECRET, "1001", 600)
        assert (await c.call({"op": "auth", "token": token}))["uid"] == "1001"
        (conn,) = running.daemon.gateway.connections
        assert conn.nursery is not None
        assert conn.nursery.child_tasks == frozenset()
        assert conn.token_watch is not None and conn.token_watch.conn is conn


async def test_logging_in_again_and_again_leaves_no_trail_of_token_checks(
    nursery: trio.Nursery,
) -> None:
    """Each login files the session's next token check and empties its previous one; a client
    that logs in again and again does not grow the gateway's heap of checks without bound."""
    limits = {"messages_per_second": 10_000, "message_burst": 10_000, "frame_burst": 10_000}
    running = await start_daemon(nursery, make_config(limits=limits))
    requests = running.daemon.gateway.requests
    async with open_client(running.ws_url) as c:
        for _ in range(300):
            token = issue_hmac_token(SECRET, "1001", 600)
            assert (await c.call({"op": "auth", "token": token}))["uid"] == "1001"
        assert len(requests._watches) <= 2 * MAX_EMPTIED + 1
    assert sum(w.conn is not None for w in requests._watches) == 0  # closed: none is live


async def test_a_failing_token_check_ends_its_connection_not_the_gateway(
    nursery: trio.Nursery, monkeypatch: Any
) -> None:
    """The token checks run in one task of the gateway: a bug in one session's check (here:
    user 1001's ``token_due`` raising) ends that connection with 1011, and another session's
    notice and expiry still come on time."""
    from pushd.gateway.session import Session

    running = await start_daemon(nursery, make_config(limits={"token_notice_s": 1.0}))
    token_due = Session.token_due

    def broken_for_1001(self: Session, now: float) -> Any:
        if self.uid == "1001":
            raise RuntimeError("a bug in one session's token check")
        return token_due(self, now)

    monkeypatch.setattr(Session, "token_due", broken_for_1001)
    ttl = 2.0
    async with open_client(running.ws_url) as broken, open_client(running.ws_url) as fine:
        for client, uid in ((broken, "1001"), (fine, "1002")):
            token = issue_hmac_token(SECRET, uid, ttl)
            assert (await client.call({"op": "auth", "token": token}))["uid"] == uid
        with trio.fail_after(ttl + 3):
            await closed_with(broken, CloseCode.INTERNAL_ERROR, "the broken session went on")
            notice = await receive(fine)
            assert notice["event"] == "@auth"
            await closed_with(fine, CloseCode.TOKEN_EXPIRED, "the session went on past its exp")


async def test_a_check_due_on_a_closing_connection_is_not_counted_again(
    nursery: trio.Nursery,
) -> None:
    """A token check that falls due while its connection is closing (here: ended by the
    server, the client never answering the close frame) is dropped and forgotten, so the
    connection's end does not count it as emptied a second time (before: the gateway's count
    of emptied checks drifted up by one per such connection, rebuilding the heap early)."""
    limits = {"token_notice_s": 1.0, "close_timeout_s": 2.0}
    running = await start_daemon(nursery, make_config(limits=limits))
    gateway = running.daemon.gateway
    raw = await RawClient.connect(running.ports.websocket)
    await raw.handshake()
    await raw.send_json({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 1.5)})
    replies, _ = await raw.read_one_batch()
    assert replies[0]["uid"] == "1001"
    (conn,) = gateway.connections
    assert conn.token_watch is not None and conn.token_watch.at < time.time() + 1.0
    gateway.end(conn, lifecycle.GOING_AWAY)  # closing for close_timeout_s: past the check
    with trio.fail_after(10):
        await gateway.wait_idle()
    assert gateway.requests._emptied == 0
    await raw.aclose()
