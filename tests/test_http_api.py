"""The publish API and the operations endpoints, over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import PUBLISH_TOKEN, RawClient, Running, make_config, open_client, start_daemon

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


async def post(running: Running, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{running.http_url}{path}", json=body, **kwargs)


async def get(running: Running, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"{running.http_url}{path}", **kwargs)


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": PUBLISH_TOKEN},
     {"authorization": f"Basic {PUBLISH_TOKEN}"}],
)  # fmt: skip
async def test_publish_needs_the_token(running: Running, headers: dict[str, str]) -> None:
    body = {"channel": "notice", "data": {}}
    assert (await post(running, "/v1/publish", body, headers=headers)).status_code == 401
    assert (
        await post(running, "/v1/publish/batch", {"messages": [body]}, headers=headers)
    ).status_code == 401
    assert (await post(running, "/v1/users/1/disconnect", headers=headers)).status_code == 401
    assert (await get(running, "/v1/stats", headers=headers)).status_code == 401
    assert running.daemon.hub.published == 0


async def test_publish_disabled_without_configured_token(nursery: Any) -> None:
    running = await start_daemon(nursery, make_config(http={"publish_token": ""}))
    r = await post(running, "/v1/publish", {"channel": "notice", "data": {}}, headers=AUTH)
    assert r.status_code == 503 and "publish_token" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"channel": "user_1001_wallet", "data": {}}, 400),
        ({"channel": "depth_XRPUSDT", "data": {}}, 400),
        ({"channel": "notice"}, 400),
        ({"channel": "notice", "data": {}, "extra": 1}, 400),
        ({"channel": "notice", "data": "x" * 70_000}, 413),
        ([1, 2], 400),
    ],
)
async def test_publish_rejects_bad_messages(running: Running, body: Any, status: int) -> None:
    r = await post(running, "/v1/publish", body, headers=AUTH)
    assert r.status_code == status and r.json()["error"]


async def test_malformed_body(running: Running) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{running.http_url}/v1/publish", content=b"{", headers=AUTH)
    assert r.status_code == 400 and r.json() == {"error": "malformed JSON"}


async def test_batch_is_all_or_nothing_and_ordered(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.call({"op": "subscribe", "channel": "notice"})
        bad = [{"channel": "notice", "data": {"i": 0}}, {"channel": "nope", "data": {}}]
        assert (
            await post(running, "/v1/publish/batch", {"messages": bad}, headers=AUTH)
        ).status_code == 400
        good = [{"channel": "notice", "data": {"i": i}} for i in range(5)]
        r = await post(running, "/v1/publish/batch", {"messages": good}, headers=AUTH)
        assert r.json() == {"result": True, "seqs": [1, 2, 3, 4, 5], "epochs": [running.epoch] * 5}
        assert [(await c.recv())["data"]["i"] for _ in range(5)] == [0, 1, 2, 3, 4]


async def test_batch_size_limit(nursery: Any) -> None:
    running = await start_daemon(nursery, make_config(http={"max_batch": 2}))
    batch = {"messages": [{"channel": "notice", "data": 1}] * 3}
    assert (await post(running, "/v1/publish/batch", batch, headers=AUTH)).status_code == 413


async def test_account_stream_through_the_publish_api(running: Running) -> None:
    async with open_client(running.ws_url) as c:
        await c.call({"op": "auth", "token": running.token("1001")})
        await c.call({"op": "subscribe", "channel": "@account"})
        data = {"uid": "1001", "equity": "1234.50000000"}
        r = await post(running, "/v1/publish", {"channel": "user_1001_account", "data": data},
                       headers=AUTH)  # fmt: skip
        assert r.json() == {"result": True, "seq": 1, "epoch": running.epoch}
        assert await c.recv() == {
            "event": "@account",
            "data": data,
            "seq": 1,
            "epoch": running.epoch,
        }


async def test_health_ready_metrics_stats(running: Running) -> None:
    assert (await get(running, "/healthz")).json() == {"status": "ok"}
    assert (await get(running, "/readyz")).json() == {"status": "ready"}
    async with open_client(running.ws_url) as c:
        await c.call({"op": "subscribe", "channel": ["BTCUSDT@depth", "notice"]})
        await running.publish("notice", {"hello": 1})
        await c.recv()
        stats = (await get(running, "/v1/stats", headers=AUTH)).json()
        assert stats["connections"] == 1 and stats["subscriptions"] == 2
        assert stats["delivered"] == 1
        metrics = (await get(running, "/metrics")).text
        assert 'pushd_connections_open{surface="native"} 1.0' in metrics
        assert "pushd_hub_delivered_total 1.0" in metrics
        assert "pushd_api_published_total 1.0" in metrics


async def test_not_ready_while_shutting_down(running: Running) -> None:
    raw = await RawClient.connect(running.ports.websocket)  # never answers the close frame
    await raw.handshake()
    running.daemon.stop()
    await trio.testing.wait_all_tasks_blocked()  # the daemon has begun its shutdown
    assert (await get(running, "/readyz")).status_code == 503
    await raw.aclose()


@pytest.mark.parametrize(
    "channel", ["depth_BTCUSDT", "trades_BTCUSDT", "ticker_ETHUSDT", "markprice_BTCUSDT",
                "kline_BTCUSDT", "kline_BTCUSDT_1h"],
)  # fmt: skip
async def test_backends_cannot_publish_market_channels(nursery: Any, channel: str) -> None:
    """Market channels are computed here: a backend must not break their seq or depth chain."""
    running = await start_daemon(nursery, make_config(http={"allow_market_publish": False}))
    r = await post(running, "/v1/publish", {"channel": channel, "data": {}}, headers=AUTH)
    assert r.status_code == 403 and "computed by pushd" in r.json()["error"]
    batch = {"messages": [{"channel": "notice", "data": {}}, {"channel": channel, "data": {}}]}
    assert (await post(running, "/v1/publish/batch", batch, headers=AUTH)).status_code == 403
    assert running.daemon.hub.published == 0  # all or nothing: the notice did not go either
    ok = await post(running, "/v1/publish", {"channel": "user_7_account", "data": {}}, headers=AUTH)
    assert ok.status_code == 200


async def test_openapi_document_is_served(running: Running) -> None:
    doc = (await get(running, "/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/publish", "/v1/publish/batch", "/v1/depth", "/readyz"} <= set(doc["paths"])
    assert "PublishItem" in doc["components"]["schemas"]
