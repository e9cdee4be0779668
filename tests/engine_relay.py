"""Ground truth for fault tests: the simulated engine's feed, copied to every compute node, with
a record of every event it sent; and clients that record what reached them.

``EngineRelay.run`` steps ``ingest.sim.Market`` and sends its market events over UDP and its
private events over TCP to each node of ``nodes`` (the list may change: a node that died just
stops getting them), as an engine's fan-out to two compute nodes would. ``Ledger`` says, per
trade id and per order update, whether it was delivered, told (a ``gap`` batch or a resync
notice received after it was sent) or lost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import trio
import trio_websocket
from conftest import Client, Running

from ingest import wire
from ingest.sim import Market
from ingest.transport import TcpSender, UdpSender


def key_of(data: Any) -> str:
    """An order update as the engine sent it and as a client got it: the same text."""
    return json.dumps(data, sort_keys=True)


class EngineRelay:
    def __init__(self, market: Market, nodes: list[Running]) -> None:
        self.market = market
        self.nodes = nodes
        self.trades: dict[tuple[str, int], float] = {}  # (symbol, id) -> when sent
        self.orders: dict[str, list[tuple[str, float]]] = defaultdict(list)  # uid -> (key, when)
        self.stopped = trio.Event()

    async def run(self, stop: trio.Event) -> None:
        senders: dict[int, tuple[UdpSender, TcpSender]] = {}
        try:
            while not stop.is_set():
                market_events, private_events = self.market.step(int(time.time() * 1000))
                now = trio.current_time()
                for node in list(self.nodes):
                    udp, tcp = senders.setdefault(id(node), (
                        UdpSender("127.0.0.1", node.ports.ingest_udp, 1),
                        TcpSender("127.0.0.1", node.ports.ingest_tcp, 2),
                    ))  # fmt: skip
                    with contextlib.suppress(
                        OSError, trio.BrokenResourceError, trio.ClosedResourceError
                    ):
                        if market_events:
                            await udp.send(market_events)
                        await (tcp.send(private_events) if private_events else tcp.heartbeat())
                for event in market_events:
                    if isinstance(event, wire.Trade):
                        self.trades[(event.symbol, event.id)] = now
                for event in private_events:
                    if isinstance(event, wire.OrderUpdate):
                        data = msgspec.json.decode(msgspec.json.encode(event))
                        self.orders[event.uid].append((key_of(data), now))
                await trio.sleep(0.02)
        finally:
            self.stopped.set()
            for udp, tcp in senders.values():
                udp.close()
                with trio.CancelScope(shield=True):
                    await tcp.aclose()


class Listener:
    """One client's record: trades delivered and told per symbol, order updates delivered and
    told (resync notices, ``recovered:false``), each with the time it arrived; where each
    stream stands (its last seq, for ``since``); the replies by id; the first depth event after
    each subscribe."""

    def __init__(self, changed: Changed) -> None:
        self.client: Client  # once connected (tests/test_faults.py connect())
        self.changed = changed
        self.closed = False  # the connection ended (its node died, or the page reloaded)
        self.trades: set[tuple[str, int]] = set()
        self.arrived: dict[tuple[str, int], float] = {}  # when each trade first arrived
        self.trades_told: dict[str, list[float]] = defaultdict(list)
        self.orders: set[str] = set()
        self.orders_told: list[float] = []
        self.order_log: list[tuple[float, str, int, bool]] = []  # (when, epoch, seq, resync)
        self.last: dict[str, dict[str, Any]] = {}  # channel -> {"seq", "epoch"} of its last event
        self.replies: dict[int, dict[str, Any]] = {}
        self.subscribed_at: list[float] = []  # when each subscribe reply came
        self.events_at: list[float] = []
        self.depth_first: list[str] = []  # the kind of the first depth event after each subscribe
        self._awaiting_depth: set[str] = set()

    async def run(self) -> None:
        try:
            while True:
                message = msgspec.json.decode(await self.client.ws.get_message())
                self.see(message, trio.current_time())
                self.changed.fire()
        except trio_websocket.ConnectionClosed:
            self.closed = True
            self.changed.fire()

    def see(self, message: dict[str, Any], now: float) -> None:
        if "id" in message:
            self.replies[message["id"]] = message
        if message.get("result") is True and "streams" in message:
            self.reply(message, now)
        event = message.get("event", "")
        data = message.get("data")
        if event:
            self.events_at.append(now)
            if "seq" in message:
                self.last[event] = {"seq": message["seq"], "epoch": message["epoch"]}
        if event.endswith("@trades"):
            symbol = event.split("@")[0]
            if message.get("resync") or (data or {}).get("gap"):
                self.trades_told[symbol].append(now)
            for item in (data or {}).get("trades", ()):
                self.trades.add((symbol, item["id"]))
                self.arrived.setdefault((symbol, item["id"]), now)
        elif event.endswith("@depth") and event in self._awaiting_depth:
            self._awaiting_depth.discard(event)
            self.depth_first.append((data or {}).get("e", "resync notice"))
        elif event == "@order":
            self.order_log.append((now, message["epoch"], message["seq"], "resync" in message))
            if message.get("resync"):
                self.orders_told.append(now)
            elif data is not None:
                self.orders.add(key_of(data))

    def reply(self, message: dict[str, Any], now: float) -> None:
        """A subscribe reply: where each stream stands; ``recovered:false`` tells the client
        that what it missed is not coming."""
        self.subscribed_at.append(now)
        for channel, where in message["streams"].items():
            self.last[channel] = where
            if channel.endswith("@depth"):
                self._awaiting_depth.add(channel)
            if message.get("recovered") is False:
                if channel.endswith("@trades"):
                    self.trades_told[channel.split("@")[0]].append(now)
                elif channel == "@order":
                    self.orders_told.append(now)

    def live_since(self, at: float, events: int = 1) -> bool:
        """``events`` events reached the client after ``at``."""
        return sum(1 for arrived in self.events_at if arrived > at) >= events


class Changed:
    """Wakes whoever waits for a client to receive something."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    async def until(self, done: Callable[[], bool], timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            while not done():
                await self.wait()


class Ledger(msgspec.Struct):
    """Delivered / told / lost, per kind, for one fault."""

    trades_sent: int = 0
    trades_delivered: int = 0
    trades_in_history: int = 0  # not delivered live, but GET /v1/trades has them
    trades_told: int = 0
    trades_lost: int = 0
    orders_sent: int = 0
    orders_delivered: int = 0
    orders_told: int = 0
    orders_lost: int = 0
    lost_examples: list[str] = msgspec.field(default_factory=list)


def account(
    relay: EngineRelay,
    public: Listener,
    users: dict[str, Listener],
    history: set[tuple[str, int]] | None = None,
) -> Ledger:
    ledger = Ledger()
    history = history or set()
    for trade, sent in relay.trades.items():
        count_trade(ledger, public, trade, sent, history)
    for uid, sent_orders in relay.orders.items():
        listener = users[uid]
        for key, sent in sent_orders:
            ledger.orders_sent += 1
            if key in listener.orders:
                ledger.orders_delivered += 1
            elif any(told > sent for told in listener.orders_told):
                ledger.orders_told += 1
            else:
                ledger.orders_lost += 1
                ledger.lost_examples.append(
                    f"order of {uid} sent at {sent:.2f}, client got {listener.order_log}"
                )
    del ledger.lost_examples[10:]
    return ledger


def count_trade(
    ledger: Ledger,
    listener: Listener,
    trade: tuple[str, int],
    sent: float,
    history: set[tuple[str, int]],
) -> None:
    """One trade the engine sent at ``sent``: delivered to ``listener``, in ``history``, told
    (a gap or resync notice after it was sent), or lost."""
    ledger.trades_sent += 1
    if trade in listener.trades:
        ledger.trades_delivered += 1
    elif trade in history:
        ledger.trades_in_history += 1
    elif any(told > sent for told in listener.trades_told[trade[0]]):
        ledger.trades_told += 1
    else:
        ledger.trades_lost += 1
        ledger.lost_examples.append(f"trade {trade[0]} {trade[1]} sent at {sent:.2f}")


def account_subscriptions(
    ledger: Ledger, relay: EngineRelay, listener: Listener, symbol: str
) -> None:
    """A client that subscribed to ``symbol``'s trades again and again: in each subscription,
    every trade the engine sent after the subscribe reply, up to the last one that arrived in
    it, reached the client or it was told (what was sent while it was not subscribed, or after
    it left, is not its due); counted into ``ledger``."""
    starts = [*listener.subscribed_at, math.inf]
    for start, end in itertools.pairwise(starts):
        got = [i for (s, i), at in listener.arrived.items() if s == symbol and start <= at < end]
        for (s, trade_id), sent in relay.trades.items():
            if s == symbol and sent > start and trade_id <= max(got, default=-1):
                count_trade(ledger, listener, (s, trade_id), sent, set())


def settled(relay: EngineRelay, public: Listener, users: dict[str, Listener]) -> bool:
    """Everything the engine sent has reached a client or been told."""
    ledger = account(relay, public, users)
    return ledger.trades_lost == 0 and ledger.orders_lost == 0
