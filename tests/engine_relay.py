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
import json
import time
from collections import defaultdict
from typing import Any

import msgspec
import trio
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
    told (resync notices), each with the time it arrived."""

    def __init__(self, client: Client, changed: Changed) -> None:
        self.client = client
        self.changed = changed
        self.trades: set[tuple[str, int]] = set()
        self.arrived: dict[tuple[str, int], float] = {}  # when each trade first arrived
        self.trades_told: dict[str, list[float]] = defaultdict(list)
        self.orders: set[str] = set()
        self.orders_told: list[float] = []
        self.order_log: list[tuple[float, str, int, bool]] = []  # (when, epoch, seq, resync)

    async def run(self) -> None:
        while True:
            message = msgspec.json.decode(await self.client.ws.get_message())
            self.see(message, trio.current_time())
            self.changed.fire()

    def see(self, message: dict[str, Any], now: float) -> None:
        event = message.get("event", "")
        data = message.get("data")
        if event.endswith("@trades"):
            symbol = event.split("@")[0]
            if message.get("resync") or (data or {}).get("gap"):
                self.trades_told[symbol].append(now)
            for item in (data or {}).get("trades", ()):
                self.trades.add((symbol, item["id"]))
                self.arrived.setdefault((symbol, item["id"]), now)
        elif event == "@order":
            self.order_log.append((now, message["epoch"], message["seq"], "resync" in message))
            if message.get("resync"):
                self.orders_told.append(now)
            elif data is not None:
                self.orders.add(key_of(data))


class Changed:
    """Wakes whoever waits for a client to receive something."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


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
    for (symbol, trade_id), sent in relay.trades.items():
        ledger.trades_sent += 1
        if (symbol, trade_id) in public.trades:
            ledger.trades_delivered += 1
        elif (symbol, trade_id) in history:
            ledger.trades_in_history += 1
        elif any(told > sent for told in public.trades_told[symbol]):
            ledger.trades_told += 1
        else:
            ledger.trades_lost += 1
            ledger.lost_examples.append(f"trade {symbol} {trade_id}")
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


def settled(relay: EngineRelay, public: Listener, users: dict[str, Listener]) -> bool:
    """Everything the engine sent has reached a client or been told."""
    ledger = account(relay, public, users)
    return ledger.trades_lost == 0 and ledger.orders_lost == 0
