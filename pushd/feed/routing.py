"""Where engine events go: private ones to their owner's channel, market ones to Markets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from ingest import wire
from pushd.bus.model import Bus, Outgoing
from pushd.channels import private_channel
from pushd.feed.intake import PrivateEvent

_STREAM = {
    wire.OrderUpdate: "order",
    wire.BalanceUpdate: "balance",
    wire.PositionUpdate: "position",
    wire.AccountUpdate: "account",
}
_encoder = msgspec.json.Encoder()


class MarketSink(Protocol):
    def trade(self, trade: wire.Trade) -> None: ...

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def resync(self, symbols: set[str], reason: str) -> None: ...


class EngineRouter:
    """The IngestSink of the daemon."""

    def __init__(self, bus: Bus, markets: MarketSink, private_gap: Callable[[str], None]) -> None:
        self._bus = bus
        self.leads: Callable[[], bool] = lambda: True  # this node publishes private events
        self._markets = markets
        self.trade = markets.trade
        self.index_price = markets.index_price
        self.resync = markets.resync
        self.private_gap = private_gap

    def private(self, event: PrivateEvent) -> None:
        if not self.leads():
            return
        channel = private_channel(event.uid, _STREAM[type(event)])
        self._bus.publish([Outgoing(channel, msgspec.Raw(_encoder.encode(event)))])
