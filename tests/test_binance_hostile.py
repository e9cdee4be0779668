"""The Binance surface against hostile and sloppy clients, through real sockets: bad stream
names and garbage get nested errors on an open socket, an oversize frame is closed with 1009,
the stream limit holds, bad paths are refused."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from binance_clients import start_surfaces
from conftest import RawClient, Running, make_config, open_client, start_daemon, start_feed
from redis_servers import RedisServer
from structlog.testing import capture_logs
from test_tls import Certificates
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, TextMessage

from ingest.sim import Market
from pushd.binance.ids import update_id
from pushd.bus.model import new_epoch
from pushd.channels import KLINE_INTERVALS
from pushd.errors import CloseCode

SYMBOLS = [f"S{i:02d}USDT" for i in range(40)]  # enough for 1,025 distinct stream names
PER_SYMBOL = ["trade", "aggTrade", "ticker", "miniTicker", "bookTicker", "depth", "depth@100ms",
              "depth@250ms", "depth@500ms", "depth@1000ms", "depth5", "depth10", "depth20",
              *(f"kline_{iv}" for iv in KLINE_INTERVALS)]  # fmt: skip


async def start(nursery: trio.Nursery, bus: dict[str, Any] | None = None, **spot: Any) -> Running:
    markets = {symbol: {} for symbol in ["BTCUSDT", *SYMBOLS]}
    config = make_config(binance={"spot": {"enabled": True, "port": 0, **spot},
                                  "futures": {"enabled": True, "port": 0}},
                         markets=markets, bus=bus or {})  # fmt: skip
    return await start_daemon(nursery, config)


def names(count: int) -> list[str]:
    every = [f"{symbol.lower()}@{kind}" for symbol in SYMBOLS for kind in PER_SYMBOL]
    assert len(every) >= count
    return every[:count]


async def client(running: Running, path: str = "/ws") -> RawClient:
    raw = await RawClient.connect(running.ports.binance_spot, path=path)
    assert isinstance(await raw.handshake(), AcceptConnection)
    return raw


async def call(raw: RawClient, request: Any) -> Any:
    if isinstance(request, str):
        await raw.stream.send_all(raw.ws.send(TextMessage(request)))
    else:
        await raw.send_json(request)
    messages, code = await raw.read_one_batch()
    assert code is None and len(messages) == 1, (messages, code)
    return messages[0]


async def test_bad_requests_get_nested_errors_and_the_socket_stays_open(
    nursery: trio.Nursery,
) -> None:
    running = await start(nursery)
    raw = await client(running, "/ws/0")
    bad = await call(raw, {"method": "SUBSCRIBE", "params": ["btcusdt@nonsense"], "id": 1})
    assert bad["id"] == 1 and bad["error"]["code"] == 2
    garbage = await call(raw, "{garbage")
    assert garbage["id"] is None and garbage["error"]["code"] == 3
    assert (await call(raw, "\u00ff" * 10))["error"]["code"] == 3
    assert (await call(raw, {"method": "SET_PROPERTY", "params": ["x", 1], "id": "a"}))[
        "error"]["code"] == 0  # fmt: skip
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    ok = await call(raw, {"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": uuid})
    assert ok == {"result": None, "id": uuid}
    listed = await call(raw, {"method": "LIST_SUBSCRIPTIONS", "id": 2})
    assert listed == {"result": ["btcusdt@trade"], "id": 2}
    await raw.aclose()


async def test_a_200_stream_subscribe_fits_and_the_1025th_stream_is_refused(
    nursery: trio.Nursery,
) -> None:
    running = await start(nursery)
    raw = await client(running)
    first = names(1025)
    request = {"method": "SUBSCRIBE", "params": first[:200], "id": 1}
    assert len(str(request)) > 4096  # over pushd's own message limit
    assert await call(raw, request) == {"result": None, "id": 1}
    rest = {"method": "SUBSCRIBE", "params": first[200:1024], "id": 2}
    assert await call(raw, rest) == {"result": None, "id": 2}
    over = await call(raw, {"method": "SUBSCRIBE", "params": first[1024:], "id": 3})
    assert over["error"]["code"] == 2 and over["id"] == 3
    listed = await call(raw, {"method": "LIST_SUBSCRIPTIONS", "id": 4})
    assert listed["result"] == first[:1024]
    await raw.aclose()


async def test_a_flood_of_1024_stream_subscribes_is_closed_for_its_message_rate(
    nursery: trio.Nursery,
) -> None:
    """A SUBSCRIBE of N streams costs ceil(N / 100) message tokens (burst 50, 20 a second):
    a client repeating a 1,024-stream SUBSCRIBE (11 each) is closed with 4001 within the
    burst, as Binance closes a connection past its message rate; counted by names sent, so
    names already subscribed cost as much. A single 1,024-stream SUBSCRIBE is answered."""
    running = await start(nursery)
    raw = await client(running)
    request = {"method": "SUBSCRIBE", "params": names(1024), "id": 1}
    assert await call(raw, request) == {"result": None, "id": 1}
    for request_id in range(2, 12):  # 10 more: 110 tokens against the 39 left and 20 a second
        await raw.send_json({**request, "id": request_id})
    messages, code = await raw.read_until_close()
    assert code == CloseCode.RATE_LIMITED
    assert len(messages) < 9  # answered while tokens lasted (3, on a quick machine)


async def test_a_heavy_subscribe_costs_at_most_the_whole_message_burst(
    nursery: trio.Nursery,
) -> None:
    """With a message burst below a 1,024-stream SUBSCRIBE's 11 tokens (5: Binance's own
    rate), the subscribe costs the whole bucket and is answered, as the REST budget lets its
    heaviest request through a full bucket (before: it could never be paid, and the first
    such subscribe closed the connection with 4001)."""
    markets = {symbol: {} for symbol in ["BTCUSDT", *SYMBOLS]}
    config = make_config(binance={"spot": {"enabled": True, "port": 0}},
                         markets=markets, limits={"message_burst": 5})  # fmt: skip
    running = await start_daemon(nursery, config)
    raw = await client(running)
    request = {"method": "SUBSCRIBE", "params": names(1024), "id": 1}
    assert await call(raw, request) == {"result": None, "id": 1}
    await raw.aclose()


async def test_an_oversize_frame_is_closed_with_1009(nursery: trio.Nursery) -> None:
    running = await start(nursery, max_message_bytes=8192)
    raw = await client(running)
    await raw.send_json({"method": "SUBSCRIBE", "params": ["x" * 9000], "id": 1})
    _, code = await raw.read_until_close()
    assert code == 1009


async def test_bad_paths_are_refused(nursery: trio.Nursery) -> None:
    running = await start(nursery)
    raw = await RawClient.connect(running.ports.binance_spot, path="/nowhere")
    answer = await raw.handshake()
    assert isinstance(answer, RejectConnection) and answer.status_code == 404
    raw = await client(running, "/ws/btcusdt@nonsense")  # accepted, then closed: a bad stream
    _, code = await raw.read_until_close()
    assert code == 1008


async def test_combined_payloads_and_pre_subscribed_paths(nursery: trio.Nursery) -> None:
    running = await start(nursery)
    batch = {"s": "BTCUSDT", "trades": [
        {"id": 1, "price": "1.5", "qty": "2", "side": "buy", "ts": 10},
        {"id": 2, "price": "1.6", "qty": "3", "side": "sell", "ts": 11}]}  # fmt: skip
    wrapped = await client(running, "/stream?streams=btcusdt@trade/btcusdt@aggTrade")
    plain = await client(running, "/ws/btcusdt@trade")
    switched = await client(running, "/ws")
    await call(switched, {"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 1})
    combined = {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2}
    assert await call(switched, combined) == {"result": None, "id": 2}
    await running.publish("trades_BTCUSDT", batch)
    got = await read(wrapped, 4)
    assert [(m["stream"], m["data"]["e"]) for m in got] == [
        ("btcusdt@trade", "trade"), ("btcusdt@trade", "trade"),
        ("btcusdt@aggTrade", "aggTrade"), ("btcusdt@aggTrade", "aggTrade")]  # fmt: skip
    assert [m["t"] for m in await read(plain, 2)] == [1, 2]
    assert [m["data"]["t"] for m in await read(switched, 2)] == [1, 2]


async def rest_get(running: Running, path: str) -> tuple[int, Any]:
    async with httpx.AsyncClient() as http:
        answer = await http.get(running.http_url + path)
    return answer.status_code, answer.json()


async def read(raw: RawClient, count: int) -> list[Any]:
    messages: list[Any] = []
    while len(messages) < count:
        batch, code = await raw.read_one_batch()
        assert code is None
        messages += batch
    assert len(messages) == count
    return messages


async def test_the_server_pings(nursery: trio.Nursery) -> None:
    running = await start(nursery, ping_interval_s=0.05)
    raw = await client(running)
    with trio.fail_after(10):
        while True:
            raw.ws.receive_data(await raw.stream.receive_some(65536))
            events = list(raw.ws.events())
            assert not any(isinstance(e, CloseConnection) for e in events)
            if any(isinstance(e, Ping) for e in events):
                break


async def test_a_client_that_answers_no_ping_is_closed(nursery: trio.Nursery) -> None:
    running = await start(nursery, ping_interval_s=0.05, pong_timeout_s=0.2)
    silent = await client(running)  # wsproto does not answer pings by itself
    polite = await client(running)
    pings = 0
    with trio.fail_after(10):
        while pings < 12:  # 0.6 s of pings, three times the timeout: answered, it stays
            polite.ws.receive_data(await polite.stream.receive_some(65536))
            for event in polite.ws.events():
                assert not isinstance(event, CloseConnection)
                if isinstance(event, Ping):
                    pings += 1
                    await polite.stream.send_all(polite.ws.send(event.response()))
    _, code = await silent.read_until_close()
    assert code == 1008


async def test_wss_on_a_binance_surface(nursery: trio.Nursery, tmp_path: Path) -> None:
    """cryptofeed refuses ws://: the surface serves wss:// with its own certificate."""
    certs = Certificates(tmp_path)
    running = await start(nursery, **certs.tls_section())
    url = f"wss://127.0.0.1:{running.ports.binance_spot}/ws"
    async with open_client(url, ssl_context=certs.client_context()) as tls_client:
        answer = await tls_client.call({"method": "LIST_SUBSCRIPTIONS", "id": 1})
        assert answer == {"result": [], "id": 1}


async def test_every_listener_of_a_node_shares_the_one_flusher(nursery: trio.Nursery) -> None:
    """The hub has one dirty list and wakes one flusher: each gateway made its own before,
    the last one made took every write (the native one's never ran, its stall and round
    figures stayed 0) and ended native connections with a Binance gateway's limits."""
    running = await start(nursery)
    daemon = running.daemon
    flushers = {id(g.flusher) for g in (daemon.gateway, *daemon.binance.values())}
    assert flushers == {id(daemon.gateway.flusher)}
    async with open_client(running.ws_url) as native:
        await native.call({"op": "subscribe", "channel": "notice", "id": 1})
        await running.publish("notice", {"n": 1})
        event = await native.recv()
        assert event["data"] == {"n": 1}
    assert daemon.gateway.flush_round_max_s > 0  # the round was the native gateway's figure


# ticker data a Binance ticker cannot be computed from (quoteVolume is no number), and a depth
# state with a price that is no number: both pass the publish API's check (JSON in UTF-8)
BAD_TICKER = {"s": "BTCUSDT", "open": "1", "high": "1", "low": "1", "last": "1", "volume": "2",
              "quoteVolume": "abc", "change": "0", "changePercent": "0", "count": 1,
              "firstId": 1, "lastId": 1, "openTime": 1, "closeTime": 2}  # fmt: skip
BAD_BOOK = {"e": "snapshot", "s": "BTCUSDT", "U": 1, "u": 1, "pu": 0, "bids": [["abc", "1"]],
            "asks": [], "checksum": 0, "T": 1}  # fmt: skip


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_malformed_market_data_costs_the_view_its_event_only(
    nursery: trio.Nursery, bus: str
) -> None:
    """An encoder that raised on data it cannot read (decimal.InvalidOperation is no
    ValueError) made the publish answer 500 on the memory bus and ended the process on
    Redis (the follower's task): it costs that view that event, nothing else."""
    with contextlib.ExitStack() as stack:
        if bus == "redis":
            redis = stack.enter_context(RedisServer())
            running = await start(nursery, bus={"kind": "redis", "redis": {"url": redis.url}})
        else:
            running = await start(nursery)
        await _malformed(running)


async def _malformed(running: Running) -> None:
    ticker = await client(running, "/ws/btcusdt@ticker")
    book = await client(running, "/ws/btcusdt@bookTicker")
    async with open_client(running.ws_url) as native:
        await native.call({"op": "subscribe", "channel": "BTCUSDT@ticker", "id": 1})
        await running.publish("ticker_BTCUSDT", BAD_TICKER)
        assert (await native.recv())["data"] == BAD_TICKER
        await running.publish("depth_BTCUSDT", BAD_BOOK)
        good = {**BAD_TICKER, "quoteVolume": "4"}
        await running.publish("ticker_BTCUSDT", good)
        assert (await native.recv())["data"] == good
    [event] = await read(ticker, 1)  # the bad one was not sent, the socket is open
    assert (event["e"], event["w"]) == ("24hrTicker", "2.00000000")
    await book.send_json({"method": "LIST_SUBSCRIPTIONS", "id": 1})
    assert await read(book, 1) == [{"result": ["btcusdt@bookTicker"], "id": 1}]


async def test_a_native_subscriber_after_a_binance_one_gets_pushds_own_names(
    nursery: trio.Nursery,
) -> None:
    """The hub's route of a channel is made by its first subscriber, and names every native
    frame after it: a Binance client first made it with the Binance stream's name, and native
    subscribers got events of ``btcusdt@ticker`` instead of ``BTCUSDT@ticker``."""
    running = await start(nursery)
    binance = await client(running, "/ws")
    subscribe = {"method": "SUBSCRIBE", "params": ["btcusdt@miniTicker"], "id": 1}
    assert await call(binance, subscribe) == {"result": None, "id": 1}
    async with open_client(running.ws_url) as native:
        await native.call({"op": "subscribe", "channel": "BTCUSDT@ticker", "id": 1})
        await running.publish("ticker_BTCUSDT", {**BAD_TICKER, "quoteVolume": "4"})
        assert (await native.recv())["event"] == "BTCUSDT@ticker"
    assert running.daemon.gateway.hub.stats().by_stream == {"ticker": 1}  # the Binance one


async def test_resets_at_every_step_leave_no_view_behind(nursery: trio.Nursery) -> None:
    """Clients that subscribe, switch the payload form, unsubscribe and reset (RST) at each
    step, on raw and combined paths: once their sockets are gone, no view, route or
    connection is left (a view kept would be encoded and written for nobody, for ever)."""
    running = await start(nursery)
    gateway = running.daemon.binance["spot"]
    streams = ["btcusdt@trade", "btcusdt@aggTrade", "btcusdt@depth", "btcusdt@depth5",
               "btcusdt@bookTicker", "btcusdt@ticker", "s00usdt@kline_1m",
               "s01usdt@depth20@100ms", "!ticker@arr", "!miniTicker@arr"]  # fmt: skip
    requests = [
        {"method": "SUBSCRIBE", "params": streams, "id": 1},
        {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2},
        {"method": "UNSUBSCRIBE", "params": streams[:3], "id": 3},
        {"method": "SET_PROPERTY", "params": ["combined", False], "id": 4},
    ]
    for step in range(len(requests) + 1):
        for path in ("/ws", "/stream?streams=btcusdt@trade/btcusdt@depth5/!miniTicker@arr"):
            raw = await client(running, path)
            for request in requests[:step]:
                await raw.send_json(request)
            raw.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await raw.aclose()  # an RST, whatever was read
    with trio.fail_after(10):
        await gateway.wait_idle()
    assert not gateway.connections
    assert running.daemon.gateway.hub.stats().channels == 0


async def test_a_reloads_request_rate_applies_to_open_connections(nursery: trio.Nursery) -> None:
    """As on pushd's own surface: a reload's request limits reach connections already open
    (a Binance connection kept the rate it opened with)."""
    running = await start(nursery)
    raw = await client(running)
    assert await call(raw, {"method": "LIST_SUBSCRIPTIONS", "id": 0}) == {"result": [], "id": 0}
    tighter = msgspec.structs.replace(
        running.daemon.config,
        limits=msgspec.structs.replace(
            running.daemon.config.limits, messages_per_second=0.01, message_burst=2
        ),
    )
    running.daemon.load_config = lambda: tighter
    change = await running.daemon.reload()
    assert change is not None and "limits.message_burst" in change.applied
    for request_id in range(1, 5):
        await raw.send_json({"method": "LIST_SUBSCRIPTIONS", "id": request_id})
    _, code = await raw.read_until_close()
    assert code == CloseCode.RATE_LIMITED


async def test_a_view_subscriber_that_never_reads_is_closed_and_costs_others_nothing(
    nursery: trio.Nursery,
) -> None:
    """Through real sockets: a client of a view that never reads (a small receive buffer)
    is closed once its buffer is full; the other subscriber of that view gets every trade."""
    running = await start(nursery)
    stuck = await RawClient.connect(running.ports.binance_spot, path="/ws/btcusdt@trade",
                                    rcvbuf=4096)  # fmt: skip
    assert isinstance(await stuck.handshake(), AcceptConnection)
    reader = await client(running, "/ws/btcusdt@trade")
    gateway = running.daemon.binance["spot"]
    trade = {"price": "1.5", "qty": "2", "side": "buy", "ts": 10}
    batch = {"s": "BTCUSDT", "trades": [{"id": i, **trade} for i in range(50)]}
    hub, ids = running.daemon.gateway.hub, list[int]()
    with trio.fail_after(30):
        while len(gateway.connections) == 2:  # until the stuck one is closed (slow consumer)
            await running.publish_batch([{"channel": "trades_BTCUSDT", "data": batch}] * 20)
            while len(ids) < hub.published * 50:  # the reader keeps up, the stuck one fills
                ids += [t["t"] for t in (await reader.read_one_batch())[0]]
    assert ids == list(range(50)) * hub.published  # every trade, in order
    assert running.daemon.gateway.hub.stats().by_stream == {"trades": 1}


async def test_an_epoch_a_day_ahead_gives_out_no_binance_id_until_a_correct_one(
    nursery: trio.Nursery,
) -> None:
    """The bus's epoch turns a week ahead of the clock mid-stream (a node whose clock ran
    ahead made it, or it was written into Redis): its ids would stand above those of every
    correct epoch after it, and ccxt would drop those. No Binance depth event of it is sent,
    REST depth answers -1001 for the book it numbers, the node logs it once; when a correct
    epoch comes, events resume below the refused ids, after a break in the chain (clients
    resync on it)."""
    market = Market(seed=3, rate=20)
    running = await start_surfaces(nursery, market)
    feeding = start_feed(nursery, running, market)
    binance = await client(running, "/ws/btcusdt@depth")
    [before] = await read(binance, 1)
    bus = running.daemon.bus
    ahead = new_epoch(time.time_ns() // 1_000_000 + 7 * 86_400_000)
    with capture_logs() as logs:
        async with open_client(running.ws_url) as native:
            await native.call({"op": "subscribe", "channel": "BTCUSDT@depth", "id": 1})
            bus.epoch = ahead
            with trio.fail_after(10):  # pushd's own subscribers get its events
                while (await native.recv()).get("epoch") != ahead:
                    pass
        status, answer = await rest_get(running, "/api/v3/depth?symbol=BTCUSDT")
        assert (status, answer["code"]) == (503, -1001)  # the book it numbers: refused
        bus.epoch = new_epoch()  # a correct epoch (after the first one: its ids above)
        got: list[Any] = []
        with trio.fail_after(10):
            while not got or got[-1]["u"] < update_id(bus.epoch, 0):
                got += await read(binance, 1)
    feeding.cancel()
    said = [line for line in logs if "depth epoch" in line["event"]]
    assert [line["epoch"] for line in said] == [ahead]  # once, views and REST together
    assert all(event["u"] < update_id(ahead, 0) for event in [before, *got])
    chain = [before, *got]
    breaks = [b for a, b in itertools.pairwise(chain) if b["U"] != a["u"] + 1]
    assert breaks == [got[-1]]  # the first event of the correct epoch: a visible break
