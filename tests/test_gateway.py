"""The client protocol over real sockets: every channel, every error path, isolation, limits."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket
from conftest import Client, RawClient, Running, make_config, open_client, start_daemon, subscribed
from wsproto.events import AcceptConnection

from pushd.errors import CloseCode, ErrorCode

PUBLIC = [  # (depth: its first event is a book, test_a_depth_subscriber_gets_no_diff_before_a_book)
    ("BTCUSDT@trades", "trades_BTCUSDT"),
    ("ETHUSDT@markPrice", "markprice_ETHUSDT"),
    ("ETHUSDT@ticker", "ticker_ETHUSDT"),
    ("SOLUSDT@kline", "kline_SOLUSDT"),
    ("SOLUSDT@kline_1h", "kline_SOLUSDT_1h"),
    ("notice", "notice"),
]
PRIVATE = ["balance", "order", "position", "account"]


@pytest.mark.parametrize(("channel", "internal"), PUBLIC)
async def test_public_channel_without_login(running: Running, channel: str, internal: str) -> None:
    async with open_client(running.ws_url) as c:
        assert subscribed(await c.call({"op": "subscribe", "channel": channel}), channel)
        first = await running.publish(internal, {"n": 1})
        second = await running.publish(internal, {"n": 2, "p": "0.1"})
        assert await c.recv() == {
            "event": channel,
            "data": {"n": 1},
            "seq": first,
            "epoch": running.epoch,
        }
        assert await c.recv() == {
            "event": channel,
            "data": {"n": 2, "p": "0.1"},
            "seq": second,
            "epoch": running.epoch,
        }
        assert second == first + 1
        assert await c.call({"op": "unsubscribe", "channel": channel}) == {"result": True}
        await running.publish(internal, {"n": 3})
        assert (await c.call({"op": "ping"}))["op"] == "pong"  # nothing arrived in between


async def test_a_depth_subscriber_gets_no_diff_before_a_book(running: Running) -> None:
    """No engine, so no book: diffs published meanwhile are not sent (docs/streams.md:
    nothing until the first snapshot; tests/test_state_first.py has the book arrive)."""
    async with open_client(running.ws_url) as c:
        assert subscribed(await c.call({"op": "subscribe", "channel": "BTCUSDT@depth"}),
                          "BTCUSDT@depth")  # fmt: skip
        await running.publish("depth_BTCUSDT", {"e": "depthUpdate", "n": 1})
        assert (await c.call({"op": "ping"}))["op"] == "pong"  # and nothing before it
        assert running.daemon.hub.wants_state("depth_BTCUSDT")


@pytest.mark.parametrize("stream", PRIVATE)
async def test_private_channel_reaches_only_its_owner(running: Running, stream: str) -> None:
    async with open_client(running.ws_url) as alice, open_client(running.ws_url) as bob:
        reply = await alice.call({"op": "subscribe", "channel": f"@{stream}"})
        assert reply["code"] == ErrorCode.LOGIN_REQUIRED
        auth = await alice.call({"op": "auth", "token": running.token("1001"), "id": 1})
        assert auth == {"result": True, "id": 1, "uid": "1001"}
        assert subscribed(
            await alice.call({"op": "subscribe", "channel": f"@{stream}"}), f"@{stream}"
        )
        await bob.call({"op": "auth", "token": running.token("1002")})
        assert subscribed(
            await bob.call({"op": "subscribe", "channel": f"@{stream}"}), f"@{stream}"
        )

        await running.publish(f"user_1002_{stream}", {"for": "bob"})
        seq = await running.publish(f"user_1001_{stream}", {"for": "alice"})
        assert await alice.recv() == {
            "event": f"@{stream}",
            "data": {"for": "alice"},
            "seq": seq,
            "epoch": running.epoch,
        }
        assert (await bob.recv())["data"] == {"for": "bob"}


async def expect_nothing_pending(c: Client) -> None:
    """Whatever was pushed before this reply would arrive first: a pong proves the queue empty."""
    assert (await c.call({"op": "ping", "id": "fence"}))["id"] == "fence"


async def test_relogin_as_another_user_drops_private_subscriptions(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.call({"op": "auth", "token": running.token("1001")})
        await c.call({"op": "subscribe", "channel": ["@balance", "@order", "BTCUSDT@trades"]})
        assert (await c.call({"op": "auth", "token": running.token("1002")}))["uid"] == "1002"
        await running.publish("user_1001_balance", {"x": 1})
        await running.publish("user_1001_order", {"x": 1})
        await expect_nothing_pending(c)
        await running.publish("trades_BTCUSDT", {"t": 1})
        assert (await c.recv())["event"] == "BTCUSDT@trades"  # public ones stay
        await c.call({"op": "subscribe", "channel": "@balance"})
        await running.publish("user_1002_balance", {"mine": True})
        assert (await c.recv())["data"] == {"mine": True}


ODD_NAMES = [
    "user_1002_balance",
    "@balance@1002",
    "1002@balance",
    "@user_1002_balance",
    "@BALANCE",
    " @balance",
    "@balance\u0000",
    "BTCUSDT@depth/../user_1002_balance",
]


async def test_no_spelling_reaches_another_user(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        for name in ODD_NAMES:  # before login
            assert "code" in await c.call({"op": "subscribe", "channel": name})
        assert (await c.call({"op": "subscribe", "channel": "@balance"}))["code"] == 7
        await c.call({"op": "auth", "token": running.token("1001")})
        for name in ODD_NAMES:
            reply = await c.call({"op": "subscribe", "channel": name})
            assert reply["code"] in (ErrorCode.UNKNOWN_CHANNEL, ErrorCode.UNKNOWN_SYMBOL)
        for field in ({"uid": "1002"}, {"user": "1002"}):  # a uid from the client is ignored
            await c.call({"op": "subscribe", "channel": "@balance", **field})
        await running.publish("user_1002_balance", {"secret": 1})
        await expect_nothing_pending(c)
        assert running.daemon.hub.subscriber_count("user_1002_balance") == 0


@pytest.mark.parametrize(
    ("request_text", "code"),
    [
        ("{not json", ErrorCode.MALFORMED_JSON),
        ('{"op":"fly","id":3}', ErrorCode.UNKNOWN_OP),
        ('{"op":"subscribe","id":3}', ErrorCode.INVALID_REQUEST),
        ('{"op":"subscribe","channel":"BTCUSDT@nope","id":3}', ErrorCode.UNKNOWN_CHANNEL),
        ('{"op":"subscribe","channel":"XRPUSDT@depth","id":3}', ErrorCode.UNKNOWN_SYMBOL),
        ('{"op":"unsubscribe","channel":"@order","id":3}', ErrorCode.LOGIN_REQUIRED),
        ('{"op":"auth","token":"forged","id":3}', ErrorCode.AUTH_FAILED),
    ],
)
async def test_bad_request_gets_error_and_connection_survives(
    running: Running, request_text: str, code: ErrorCode
) -> None:
    async with open_client(running.ws_url) as c:
        await c.ws.send_message(request_text)
        reply = await c.recv()
        assert reply["code"] == code and reply["msg"]
        if request_text.startswith('{"op"'):
            assert reply["id"] == 3
        assert subscribed(
            await c.call({"op": "subscribe", "channel": "BTCUSDT@depth"}), "BTCUSDT@depth"
        )


async def test_binary_frame_gets_error(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.ws.send_message(b'{"op":"ping"}')
        assert (await c.recv())["code"] == ErrorCode.BINARY_NOT_SUPPORTED
        assert (await c.call({"op": "ping"}))["op"] == "pong"


async def test_channel_list_and_ids(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        reply = await c.call(
            {"op": "subscribe", "channel": ["BTCUSDT@depth", "ETHUSDT@trades"], "id": "a"}
        )
        assert subscribed(reply, "BTCUSDT@depth", "ETHUSDT@trades") and reply["id"] == "a"
        bad = await c.call({"op": "subscribe", "channel": ["SOLUSDT@ticker", "nope"], "id": 2})
        assert bad["code"] == ErrorCode.UNKNOWN_CHANNEL and bad["id"] == 2
        await running.publish("ticker_SOLUSDT", {})  # all or nothing: not subscribed
        await running.publish("trades_ETHUSDT", {"t": 1})
        assert (await c.recv())["event"] == "ETHUSDT@trades"
        pong = await c.call({"op": "ping", "id": 77})
        assert pong["op"] == "pong" and pong["id"] == 77 and pong["ts"] > 1_600_000_000_000


async def test_websocket_ping_frame_is_answered(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        with trio.fail_after(5):
            await c.ws.ping(b"hello")  # returns when the matching pong arrives


async def test_failed_logins_are_rate_limited(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        codes = [(await c.call({"op": "auth", "token": f"bad{i}"}))["code"] for i in range(7)]
        assert codes[:5] == [ErrorCode.AUTH_FAILED] * 5
        assert codes[5:] == [ErrorCode.AUTH_RATE_LIMITED] * 2
        reply = await c.call({"op": "auth", "token": running.token("1001")})
        assert reply["code"] == ErrorCode.AUTH_RATE_LIMITED  # even a good token waits


async def closed_with(c: Client) -> int:
    with pytest.raises(trio_websocket.ConnectionClosed) as info:
        with trio.fail_after(5):
            while True:
                await c.ws.get_message()
    code: int = info.value.reason.code
    return code


async def test_huge_message_closes_with_1009(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.ws.send_message('{"op":"ping","pad":"' + "x" * 100_000 + '"}')
        assert await closed_with(c) == CloseCode.MESSAGE_TOO_BIG
    async with open_client(running.ws_url) as other:  # the daemon goes on
        assert (await other.call({"op": "ping"}))["op"] == "pong"


async def test_request_flood_closes_with_4001(nursery: trio.Nursery) -> None:
    config = make_config(limits={"messages_per_second": 1.0, "message_burst": 3})
    running = await start_daemon(nursery, config)
    async with open_client(running.ws_url) as c:
        for _ in range(5):
            await c.send({"op": "ping"})
        assert await closed_with(c) == CloseCode.RATE_LIMITED


async def test_shutdown_closes_clients_with_1001(nursery: trio.Nursery) -> None:
    running = await start_daemon(nursery, make_config())
    async with open_client(running.ws_url) as a, open_client(running.ws_url) as b:
        await a.call({"op": "subscribe", "channel": "BTCUSDT@depth"})
        await b.call({"op": "ping"})
        running.daemon.stop()
        assert await closed_with(a) == CloseCode.GOING_AWAY
        assert await closed_with(b) == CloseCode.GOING_AWAY


async def test_operator_disconnect_closes_with_4003(running: Running) -> None:
    import httpx
    from conftest import PUBLISH_TOKEN

    async with open_client(running.ws_url) as a, open_client(running.ws_url) as b:
        await a.call({"op": "auth", "token": running.token("1001")})
        await b.call({"op": "auth", "token": running.token("1002")})
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{running.http_url}/v1/users/1001/disconnect",
                headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
            )
        assert r.json() == {"result": True, "closed": 1}
        assert await closed_with(a) == CloseCode.KICKED
        assert (await b.call({"op": "ping"}))["op"] == "pong"


async def handshake_status(port: int, **kwargs: Any) -> int:
    raw = await RawClient.connect(port, **kwargs)
    event = await raw.handshake()
    await raw.aclose()
    return 101 if isinstance(event, AcceptConnection) else event.status_code  # type: ignore[union-attr]


async def test_handshake_checks(nursery: trio.Nursery) -> None:
    config = make_config(
        websocket={"allowed_origins": ["https://exchange.example"], "max_connections": 2}
    )
    running = await start_daemon(nursery, config)
    port = running.ports.websocket
    assert await handshake_status(port, path="/elsewhere") == 404
    evil = [(b"origin", b"https://evil.example")]
    assert await handshake_status(port, headers=evil) == 403
    good = [(b"origin", b"https://exchange.example")]
    assert await handshake_status(port, headers=good) == 101
    assert await handshake_status(port) == 101  # no Origin: not a browser
    async with open_client(running.ws_url), open_client(running.ws_url):
        assert await handshake_status(port) == 503


async def test_garbage_before_handshake(running: Running) -> None:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.websocket)
        await stream.send_all(b"\x16\x03\x01garbage\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
    async with open_client(running.ws_url) as c:
        assert (await c.call({"op": "ping"}))["op"] == "pong"


async def test_invalid_frame_closes_only_that_client(running: Running) -> None:
    async with open_client(running.ws_url) as good:
        raw = await RawClient.connect(running.ports.websocket)
        assert isinstance(await raw.handshake(), AcceptConnection)
        await raw.send_raw(b"\x81\x05hello")  # unmasked client frame: protocol error
        _, code = await raw.read_until_close()
        assert code == 1002
        await raw.aclose()
        assert (await good.call({"op": "ping"}))["op"] == "pong"


async def test_event_name_is_canonical_whoever_subscribed_first(running: Running) -> None:
    async with open_client(running.ws_url) as first, open_client(running.ws_url) as second:
        reply = await first.call({"op": "subscribe", "channel": "SOLUSDT@kline_1m"})
        assert subscribed(reply, "SOLUSDT@kline")  # streams go by their canonical event name
        bad = await first.call({"op": "subscribe", "channel": "SOLUSDT@trades_", "id": 1})
        assert bad["code"] == ErrorCode.UNKNOWN_CHANNEL
        reply = await second.call({"op": "subscribe", "channel": "SOLUSDT@kline"})
        assert subscribed(reply, "SOLUSDT@kline")
        seq = await running.publish("kline_SOLUSDT", {"k": 1})
        for c in (first, second):
            assert await c.recv() == {
                "event": "SOLUSDT@kline",
                "data": {"k": 1},
                "seq": seq,
                "epoch": running.epoch,
            }
