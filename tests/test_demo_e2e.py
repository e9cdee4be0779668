"""End to end as ``pushd demo`` runs it: simulated engine -> daemon -> WebSocket clients.

A client keeps a local book for every symbol from snapshot + diffs and, at every event, checks
it against the book the engine served at that version; every channel's seq has no gap; the
logged-in demo user's order, balance and position events add up to its fills.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import trio
from conftest import feed, open_client, start_simulated, subscribed

from ingest import wire
from ingest.sim import INITIAL_USDT, Market
from pushd.market.depth import DepthEvent, LocalBook

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
UID = "1001"
DEPTH_EVENTS_EACH = 25


class Recorder:
    """The simulated engine's snapshot server, remembering every book it served by version."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.served: dict[tuple[str, int], wire.BookSnapshot] = {}

    def __call__(self, symbol: str, depth: int, request_id: int) -> wire.BookSnapshot:
        snapshot = self.market.book(symbol, depth, request_id)
        self.served[(symbol, snapshot.update_id)] = snapshot
        return snapshot


class Watcher:
    """What the test client saw: local books, seqs per channel, the user's private events."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.books = {symbol: LocalBook() for symbol in SYMBOLS}
        self.depth_events: dict[str, int] = defaultdict(int)
        self.seqs: dict[str, int] = {}
        self.private: list[dict[str, Any]] = []
        self.events: dict[str, int] = defaultdict(int)

    def see(self, message: dict[str, Any]) -> None:
        name = message["event"]
        assert "resync" not in message, f"a reading client was told to resync: {message}"
        previous = self.seqs.get(name)
        assert previous is None or message["seq"] == previous + 1, f"seq gap on {name}"
        self.seqs[name] = message["seq"]
        self.events[name.split("@")[1]] += 1
        if name.endswith("@depth"):
            event = msgspec.convert(message["data"], DepthEvent)
            book = self.books[event.s]
            book.apply(event)  # raises on a broken update-id chain or a checksum mismatch
            engine = self.recorder.served[(event.s, event.u)]
            assert book.sorted() == (list(engine.bids), list(engine.asks))
            self.depth_events[event.s] += 1
        elif name.startswith("@"):
            self.private.append(message)

    def done(self) -> bool:
        return (
            all(self.depth_events[s] >= DEPTH_EVENTS_EACH for s in SYMBOLS)
            and any(m["event"] == "@position" for m in self.private)
            and all(self.events[k] for k in ("trades", "ticker", "kline", "markPrice"))
        )


def check_private_events_add_up(private: list[dict[str, Any]]) -> None:
    """Every fill moved the order, the balance and the position consistently."""
    fills: dict[str, Decimal] = defaultdict(Decimal)
    fees = Decimal(0)
    positions: dict[str, dict[str, Any]] = {}
    balance: dict[str, Any] | None = None
    for message in private:
        data = message["data"]
        assert data["uid"] == UID
        if message["event"] == "@order":
            qty = Decimal(data["last_fill_qty"])
            fills[data["symbol"]] += qty if data["side"] == "buy" else -qty
            fees += Decimal(data["fee"])
        elif message["event"] == "@position":
            positions[data["symbol"]] = data
        elif message["event"] == "@balance":
            balance = data
    assert positions and balance is not None
    for symbol, position in positions.items():
        assert Decimal(position["qty"]) == fills[symbol]
    realized = sum((Decimal(p["realized_pnl"]) for p in positions.values()), Decimal(0))
    equity = Decimal(balance["free"]) + Decimal(balance["locked"])
    assert abs(equity - (INITIAL_USDT + realized - fees)) < Decimal("0.000001")


async def test_simulated_engine_to_clients(nursery: trio.Nursery) -> None:
    market = Market(seed=7, rate=8.0)
    recorder = Recorder(market)
    running = await start_simulated(nursery, market, recorder)
    watcher = Watcher(recorder)
    channels = [f"{s}@{k}" for s in SYMBOLS for k in ("depth", "trades", "ticker", "markPrice")]
    channels += [f"{s}@kline" for s in SYMBOLS] + ["@order", "@balance", "@position"]
    async with open_client(running.ws_url) as client:
        assert (await client.call({"op": "auth", "token": running.token(UID)}))["result"]
        await client.send({"op": "subscribe", "channel": channels, "id": 1})
        reply = await client.recv()
        assert subscribed(reply, *channels) and reply["id"] == 1
        async with trio.open_nursery() as engine:
            engine.start_soon(feed(running, market))
            with trio.fail_after(60):
                while not watcher.done():
                    watcher.see(await client.recv())
            engine.cancel_scope.cancel()
    check_private_events_add_up(watcher.private)
    assert running.daemon.intake.lost_frames == 0


async def test_rest_snapshots_match_the_stream(nursery: trio.Nursery) -> None:
    market = Market(seed=3)
    market.step(1000)
    running = await start_simulated(nursery, market)
    async with open_client(running.ws_url) as client:
        reply = await client.call({"op": "subscribe", "channel": "BTCUSDT@depth"})
        assert subscribed(reply, "BTCUSDT@depth")  # the reply first, then the book
        first = await client.recv()
        async with httpx.AsyncClient(base_url=running.http_url) as http:
            rest = (await http.get("/v1/depth", params={"symbol": "BTCUSDT", "limit": 5000})).json()
            # the engine's book is frozen (the market does not step): the stream stands still
            assert rest["channel"] == "BTCUSDT@depth"
            assert (rest["seq"], rest["data"]["u"]) == (first["seq"], first["data"]["u"])
            assert rest["epoch"] == first["epoch"] == running.epoch
            engine = market.book("BTCUSDT", 5000, 0)
            assert [tuple(lv) for lv in rest["data"]["bids"]] == engine.bids
            top = (await http.get("/v1/depth", params={"symbol": "BTCUSDT", "limit": 5})).json()
            assert len(top["data"]["bids"]) == 5
            for path, params in (
                ("/v1/depth", {"symbol": "NOPE"}),
                ("/v1/klines", {"symbol": "BTCUSDT", "interval": "7m"}),
                ("/v1/trades", {"symbol": "BTCUSDT", "limit": "0"}),
            ):
                r = await http.get(path, params=params)
                assert r.status_code == 400 and r.json()["error"]
            ticker = (await http.get("/v1/ticker", params={"symbol": "BTCUSDT"})).json()
            assert ticker == {"channel": "BTCUSDT@ticker", "seq": 0, "epoch": running.epoch,
                              "stale": False, "data": None}  # fmt: skip
