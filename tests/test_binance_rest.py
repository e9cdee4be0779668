"""The Binance surfaces' REST on pushd's HTTP port: shapes the clients read, Binance's error
body, and ids that agree with the streams. A real daemon on a simulated market."""

from __future__ import annotations

import asyncio
from typing import Any

import ccxt.async_support as ccxt
import httpx
import trio
from binance_clients import start_surfaces
from conftest import Running, make_config, open_client, start_daemon, start_feed
from redis_servers import RedisServer

from ingest.sim import Market


async def get(running: Running, path: str, status: int = 200) -> Any:
    async with httpx.AsyncClient() as http:
        answer = await http.get(running.http_url + path)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    return answer.json()


async def test_rest_shapes_errors_and_ids(nursery: trio.Nursery) -> None:
    market = Market(seed=5, rate=5)
    running = await start_surfaces(nursery, market)
    feeding = start_feed(nursery, running, market)
    streams = "btcusdt@depth@100ms/btcusdt@miniTicker/ethusdt@miniTicker/solusdt@miniTicker"
    url = f"ws://127.0.0.1:{running.ports.binance_futures}/stream?streams={streams}"
    async with open_client(url) as client:
        first: dict[str, Any] = {}
        while len(first) < 4:  # a book and every symbol's ticker exist
            message = await client.recv()
            first.setdefault(message["stream"], message["data"])
        feeding.cancel()
        depth = await get(running, "/fapi/v1/depth?symbol=BTCUSDT&limit=5")
    first = first["btcusdt@depth@100ms"]
    assert depth["lastUpdateId"] >= first["u"] and set(depth) == {"lastUpdateId", "E", "T",
                                                                   "bids", "asks"}  # fmt: skip
    assert len(depth["bids"]) == 5 and all(isinstance(p, str) for p, _ in depth["bids"])
    spot_depth = await get(running, "/api/v3/depth?symbol=BTCUSDT&limit=5")
    assert set(spot_depth) == {"lastUpdateId", "bids", "asks"}

    assert await get(running, "/api/v3/ping") == {}
    assert isinstance((await get(running, "/fapi/v1/time"))["serverTime"], int)
    spot = (await get(running, "/api/v3/exchangeInfo"))["symbols"]
    futures = (await get(running, "/fapi/v1/exchangeInfo"))["symbols"]
    assert [s["symbol"] for s in spot] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    for symbol in spot + futures:
        assert symbol["status"] == "TRADING" and symbol["quoteAsset"] == "USDT"
        assert [f["filterType"] for f in symbol["filters"]][:2] == ["PRICE_FILTER", "LOT_SIZE"]
    assert all("contractType" not in s for s in spot)
    assert all(s["contractType"] == "PERPETUAL" and s["marginAsset"] == "USDT"
               and s["pair"] == s["symbol"] and s["deliveryDate"] > 0 for s in futures)  # fmt: skip
    assert spot[0]["baseAsset"] == "BTC"
    assert (await get(running, "/dapi/v1/exchangeInfo"))["symbols"] == []  # no COIN-M

    trades = await get(running, "/api/v3/trades?symbol=BTCUSDT&limit=5")
    aggs = await get(running, "/api/v3/aggTrades?symbol=BTCUSDT&limit=5")
    assert [t["id"] for t in trades] == [a["a"] for a in aggs] == [a["f"] for a in aggs]
    assert all(isinstance(t["price"], str) and isinstance(t["time"], int) for t in trades)
    klines = await get(running, "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=3")
    assert klines and all(len(row) == 12 and isinstance(row[0], int) for row in klines)
    tickers = await get(running, "/api/v3/ticker/24hr")
    assert [t["symbol"] for t in tickers] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    one = await get(running, "/fapi/v1/ticker/24hr?symbol=ETHUSDT")
    assert one["symbol"] == "ETHUSDT" and "bidPrice" not in one
    with trio.fail_after(10):  # the feed stopped: the last diffs come, then the book stands
        while (top := await get(running, "/fapi/v1/ticker/bookTicker?symbol=BTCUSDT"))[
            "lastUpdateId"
        ] != depth["lastUpdateId"]:
            depth = await get(running, "/fapi/v1/depth?symbol=BTCUSDT&limit=5")
    assert (top["bidPrice"], top["askPrice"]) == (depth["bids"][0][0], depth["asks"][0][0])
    assert len(await get(running, "/api/v3/ticker/bookTicker")) == 3

    invalid = {"code": -1121, "msg": "Invalid symbol."}
    for path in ("/api/v3/depth?symbol=NOPE", "/fapi/v1/trades", "/api/v3/klines?symbol=xx",
                 "/fapi/v1/premiumIndex?symbol=btcusdt"):  # fmt: skip
        assert await get(running, path, 400) == invalid
    assert (await get(running, "/api/v3/depth?symbol=BTCUSDT&limit=0", 400))["code"] == -1130
    bad_interval = "/api/v3/klines?symbol=BTCUSDT&interval=7m"
    assert await get(running, bad_interval, 400) == {"code": -1120, "msg": "Invalid interval."}


MARK = {"s": "ETHUSDT", "markPrice": "1", "indexPrice": "1", "estimatedSettlePrice": "1",
        "fundingRate": "0", "premiumIndex": "0", "nextFundingTime": 1, "T": 1}  # fmt: skip
BAD_TICKER = {"s": "BTCUSDT", "open": "1", "high": "1", "low": "1", "last": "1", "volume": "2",
              "quoteVolume": "abc", "change": "0", "changePercent": "0", "count": 1,
              "firstId": 1, "lastId": 1, "openTime": 1, "closeTime": 2}  # fmt: skip


async def test_what_redis_stores_that_is_no_number_costs_its_own_answer_only(
    nursery: trio.Nursery,
) -> None:
    """Whoever can publish a market channel (or write to Redis) stores values the REST answers
    are computed from: a ticker whose quoteVolume is no number answered 500 for the symbol-less
    ticker/24hr (every symbol's: ccxt's fetch_tickers), a trade price that is no number 500
    for trades, a candle that is not one 500 for klines. What does not read is left out."""
    with RedisServer() as redis:
        config = make_config(markets={"BTCUSDT": {}, "ETHUSDT": {}},
                             bus={"kind": "redis", "redis": {"url": redis.url}})  # fmt: skip
        running = await start_daemon(nursery, config)
        good = {**BAD_TICKER, "s": "ETHUSDT", "quoteVolume": "4"}
        for channel, data in (
            ("ticker_BTCUSDT", BAD_TICKER), ("ticker_ETHUSDT", good),
            ("trades_BTCUSDT", {"s": "BTCUSDT", "trades": [
                {"id": 1, "price": "abc", "qty": "1", "side": "buy", "ts": 1},
                {"id": 2, "price": "0.00001", "qty": "0.001", "side": "buy", "ts": 2}]}),
            ("kline_BTCUSDT", {"s": "BTCUSDT"}),
            ("markprice_BTCUSDT", {**MARK, "s": "NOPEUSDT"}), ("markprice_ETHUSDT", MARK),
        ):  # fmt: skip
            await running.publish(channel, data)
        tickers = await get(running, "/api/v3/ticker/24hr")
        assert [(t["symbol"], t["weightedAvgPrice"]) for t in tickers] == [
            ("ETHUSDT", "2.00000000")]  # fmt: skip
        invalid = {"code": -1121, "msg": "Invalid symbol."}  # as before its first ticker
        assert await get(running, "/api/v3/ticker/24hr?symbol=BTCUSDT", 400) == invalid
        trades = await get(running, "/api/v3/trades?symbol=BTCUSDT")
        assert [(t["id"], t["quoteQty"]) for t in trades] == [(2, "0.00000001")]  # not 1E-8
        assert await get(running, "/api/v3/klines?symbol=BTCUSDT&interval=1m") == []
        marks = await get(running, "/fapi/v1/premiumIndex")  # a symbol it does not serve
        assert [m["symbol"] for m in marks] == ["ETHUSDT"]


async def test_an_address_past_its_request_budget_gets_429_with_retry_after(
    nursery: trio.Nursery,
) -> None:
    """``binance.rest_weight_per_minute`` per client address, over every Binance REST route:
    past it, Binance's 429 (code -1003) with ``Retry-After``, as Binance clients back off on;
    pushd's own routes are not charged."""
    config = make_config(binance={"rest_weight_per_minute": 60})
    running = await start_daemon(nursery, config)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        answers = []
        for _ in range(200):  # the bucket holds a minute's worth; it refills 1 a second
            answer = await http.get("/api/v3/ping" if len(answers) % 2 else "/fapi/v1/time")
            answers.append(answer)
            if answer.status_code != 200:
                break
        assert len(answers) > 60
        refused = answers[-1]
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == -1003 and "request weight" in refused.json()["msg"]
        assert int(refused.headers["retry-after"]) >= 1
        assert int(refused.headers["x-mbx-used-weight-1m"]) >= 59  # (a second's refill)
        assert (await http.get("/healthz")).status_code == 200

    async def ccxt_side() -> type[BaseException]:
        ex = ccxt.binance({"enableRateLimit": False})
        ex.urls["api"]["public"] = f"{running.http_url}/api/v3"
        try:
            await ex.public_get_ping()
        except Exception as exc:  # which of ccxt's errors it is, is the point
            return type(exc)
        finally:
            await ex.close()
        return type(None)

    raised = await trio.to_thread.run_sync(asyncio.run, ccxt_side())
    assert issubclass(raised, ccxt.DDoSProtection)  # ccxt's back-off error (a NetworkError)
    # the budget refills: a client that waits as told is served again (the refill outlived)
    await trio.sleep(int(refused.headers["retry-after"]))  # what the answer asks of a client
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        assert (await http.get("/api/v3/ping")).status_code == 200


async def test_answers_carry_binances_weights(nursery: trio.Nursery) -> None:
    """Every /api/v3 and /fapi/v1 answer says the address's used request weight
    (``X-MBX-USED-WEIGHT`` and ``-1M``), each route weighing as on Binance (depth by limit,
    exchangeInfo 20 on spot, trades 5 on USD-M, klines by limit on USD-M, ...), refused
    answers too; exchangeInfo says the limit in ``rateLimits``."""
    config = make_config(binance={"rest_weight_per_minute": 120})  # two tokens a second
    running = await start_daemon(nursery, config)
    charged = [  # (path, status, weight)
        ("/api/v3/depth?symbol=BTCUSDT", 200, 5), ("/api/v3/exchangeInfo", 200, 20),
        ("/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=1001", 400, 2),
        ("/fapi/v1/depth?symbol=BTCUSDT&limit=7", 400, 2),
        ("/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=1500", 200, 10),
        ("/fapi/v1/exchangeInfo", 200, 1), ("/fapi/v1/trades?symbol=BTCUSDT", 200, 5),
    ]  # fmt: skip
    used = 0
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        start = trio.current_time()
        for path, status, weight in charged:
            answer = await http.get(path)
            assert answer.status_code == status, (path, answer.text)
            used += weight
            refilled = int(2 * (trio.current_time() - start))  # whole tokens back since
            for header in ("x-mbx-used-weight", "x-mbx-used-weight-1m"):
                assert used - refilled <= int(answer.headers[header]) <= used, (path, header)
        info = (await http.get("/api/v3/exchangeInfo")).json()
    assert info["rateLimits"] == [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE",
                                   "intervalNum": 1, "limit": 120}]  # fmt: skip


async def test_limits_are_read_as_binance_reads_them(nursery: trio.Nursery) -> None:
    """``limit`` out of range: -1130; no number: -1100; spot depth cut to 5,000; USD-M depth
    only its listed values; USD-M klines up to 1,500, spot 1,000; trades and aggTrades 1,000.
    With no budget (0) nothing is counted and no weight header is sent."""
    running = await start_daemon(nursery, make_config(binance={"rest_weight_per_minute": 0}))
    bad_limit = {"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."}
    for path in ("/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=1001",
                 "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=1501",
                 "/api/v3/trades?symbol=BTCUSDT&limit=1001",
                 "/fapi/v1/aggTrades?symbol=BTCUSDT&limit=0",
                 "/fapi/v1/depth?symbol=BTCUSDT&limit=7",
                 "/fapi/v1/depth?symbol=BTCUSDT&limit=5000"):  # fmt: skip
        assert await get(running, path, 400) == bad_limit, path
    illegal = await get(running, "/api/v3/trades?symbol=BTCUSDT&limit=-5", 400)
    assert illegal["code"] == -1100 and "'limit'" in illegal["msg"]
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        answers = [await http.get(path) for path in (
            "/api/v3/depth?symbol=BTCUSDT&limit=6000",  # cut to 5,000, as Binance spot
            "/fapi/v1/depth?symbol=BTCUSDT&limit=1000",
            "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=1500",
            "/api/v3/aggTrades?symbol=BTCUSDT&limit=1000",
            *["/api/v3/exchangeInfo"] * 400)]  # fmt: skip  # 8,000 weight: no budget
    assert all(a.status_code == 200 and "x-mbx-used-weight" not in a.headers for a in answers)
    assert answers[-1].json()["rateLimits"] == []


async def test_from_id_start_and_end_time_choose_the_window(nursery: trio.Nursery) -> None:
    """``aggTrades``'s ``fromId``, ``startTime``, ``endTime`` and ``klines``'s ``startTime``,
    ``endTime`` choose what is answered, oldest first from the start, as Binance reads them
    (ccxt's ``since``); a value that is no integer is -1100. Before, they were ignored: the
    latest ``limit`` came back whatever was asked."""
    market = Market(seed=6, rate=20)
    running = await start_surfaces(nursery, market)
    feeding = start_feed(nursery, running, market)
    with trio.fail_after(30):
        while len(await get(running, "/api/v3/aggTrades?symbol=BTCUSDT")) < 12:
            pass  # each answer awaits the HTTP round trip: the feed runs meanwhile
    feeding.cancel()
    every = await get(running, "/api/v3/aggTrades?symbol=BTCUSDT&limit=1000")  # all kept
    ids = [t["a"] for t in every]
    path = "/api/v3/aggTrades?symbol=BTCUSDT&limit=2"
    assert [t["a"] for t in await get(running, f"{path}&fromId={ids[3]}")] == ids[3:5]
    start, end = every[4]["T"], every[8]["T"]
    times = f"limit=1000&startTime={start}&endTime={end}"
    window = await get(running, f"/fapi/v1/aggTrades?symbol=BTCUSDT&{times}")
    assert window and all(start <= t["T"] <= end for t in window)
    assert [t["a"] for t in window] == [t["a"] for t in every if start <= t["T"] <= end]
    klines = "/api/v3/klines?symbol=BTCUSDT&interval=1m"
    assert await get(running, klines)  # the open minute's candle
    later = every[-1]["T"] + 120_000
    assert await get(running, f"{klines}&startTime={later}") == []
    assert await get(running, f"{klines}&endTime=0") == []
    for name in ("fromId", "startTime", "endTime"):
        bad = await get(running, f"{path}&{name}=x1", 400)
        assert bad["code"] == -1100 and name in bad["msg"]
