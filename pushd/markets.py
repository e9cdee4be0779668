"""Per-symbol market state fed by ingest and the poller. Trio-free.

Keeps the engine's latest book per symbol (for new depth subscribers and the REST snapshot),
and receives trades and index prices for the market streams.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ingest import wire

log = structlog.get_logger("pushd.markets")


class Markets:
    def __init__(self, symbols: list[str], refresh_book: Callable[[str], None]) -> None:
        self.books: dict[str, wire.BookSnapshot] = {}
        self.last_trade: dict[str, wire.Trade] = {}
        self.index: dict[str, dict[str, wire.IndexPrice]] = {s: {} for s in symbols}
        self.trades = 0
        self.resyncs = 0
        self._refresh_book = refresh_book

    def trade(self, trade: wire.Trade) -> None:
        self.trades += 1
        self.last_trade[trade.symbol] = trade

    def index_price(self, event: wire.IndexPrice) -> None:
        self.index[event.symbol][event.source] = event

    def book(self, snapshot: wire.BookSnapshot) -> None:
        self.books[snapshot.symbol] = snapshot

    def resync(self, symbols: set[str], reason: str) -> None:
        self.resyncs += 1
        log.warning(
            "resyncing symbols after an ingest loss", symbols=sorted(symbols), reason=reason
        )
        for symbol in symbols:
            self._refresh_book(symbol)
