"""Where engine events go: private ones to their owner's channel, market ones to Markets.

With two compute nodes only the holder of the private lease publishes private events. A holder
that cannot renew it (Redis unreachable), or a node taking it, keeps what it routes, up to
``queue_max`` events, and publishes it once it has the lease, if it had it before
(``take_over(resumed=True)``); if another node has the lease by then, it drops them
(``abandon``): the new holder tells the private subscribers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog

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
log = structlog.get_logger("pushd.feed.routing")


class MarketSink(Protocol):
    def trade(self, trade: wire.Trade) -> None: ...

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def resync(self, symbols: set[str], reason: str) -> None: ...


class EngineRouter:
    """The IngestSink of the daemon."""

    def __init__(
        self,
        bus: Bus,
        markets: MarketSink,
        private_gap: Callable[[str], None],
        *,
        leads: Callable[[], bool] = lambda: True,
        keeps: Callable[[], bool] = lambda: False,
        queue_max: int = 0,
    ) -> None:
        """``leads``: this node publishes private events; ``keeps``: it did until Redis
        stopped answering, or is taking them over, and keeps what it routes (``queue_max``
        events at most)."""
        self._bus = bus
        self.leads = leads
        self.keeps = keeps
        self.queue_max = queue_max
        self._queued: list[Outgoing] = []
        self._overflowed = False
        self._markets = markets
        self.trade = markets.trade
        self.index_price = markets.index_price
        self.resync = markets.resync
        self.private_gap = private_gap

    def private(self, event: PrivateEvent) -> None:
        leads = self.leads()
        if not leads and not self.keeps():
            return  # a standby: the leader publishes
        channel = private_channel(event.uid, _STREAM[type(event)])
        out = Outgoing(channel, msgspec.Raw(_encoder.encode(event)))
        if leads:
            self._bus.publish([out])
        elif len(self._queued) < self.queue_max:
            self._queued.append(out)
        else:
            self._overflowed = True

    def publish(self, message: Outgoing) -> bool:
        """A backend's publish over the engine link: published by the node that took it, as
        an HTTP publish is (no lease: a backend sends each message to one node). False: the
        bus dropped it (its outbox is full: Redis is unreachable)."""
        return self._bus.publish([message]) == 1

    def take_over(self, *, resumed: bool) -> bool:
        """This node publishes the private events from now; ``resumed``: it had the lease
        until it could not renew it. True when nothing the engine sent meanwhile is missing
        (everything kept is published now); else the private subscribers must be told."""
        queued, self._queued = self._queued, []
        complete, self._overflowed = resumed and not self._overflowed, False
        if resumed and queued:
            self._bus.publish(queued)
        return complete

    def abandon(self) -> None:
        """Another node publishes the private events now: what was kept is not ours to send."""
        if self._queued:
            log.warning("private events kept through an outage dropped: another node leads",
                        events=len(self._queued))  # fmt: skip
        self._queued, self._overflowed = [], False
