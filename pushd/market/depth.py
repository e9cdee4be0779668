"""The order book stream: consecutive engine snapshots diffed into changed levels. No I/O.

Theory of operation
-------------------
The poller hands each engine snapshot (the top ``depth_levels`` of each side) to
``DepthBook.apply``. The book keeps the previous snapshot as ``price -> quantity`` maps and
returns the levels whose quantity changed, with quantity ``"0"`` for a level that left the book
(or left the top ``depth_levels``). A client that applies the diffs in order to the snapshot it
started from holds exactly the engine's book.

Update ids, as Binance's futures depth stream: the engine's book version ``update_id`` only rises.
A diff carries ``U`` (first version it covers), ``u`` (the version it brings the book to) and
``pu`` (the ``u`` of the diff before it, which is the snapshot's ``u`` for the first one). A
client's book is continuous while every diff's ``pu`` equals the previous ``u``. Snapshots with
no changed level publish nothing; the next diff's ``U`` still starts after the last ``u`` sent.
If the engine's version goes backwards (an engine restart), ``apply`` returns a full snapshot
(``e = "snapshot"``) instead of a diff: the client replaces its book.

Checksum: CRC-32 (zlib, unsigned) of the UTF-8 text made by interleaving the top 10 levels of
each side as ``bid_price:bid_qty:ask_price:ask_qty:...`` (best first; once one side runs out the
other's levels follow alone), price and quantity written exactly as the stream sends them.
"""

from __future__ import annotations

import zlib
from decimal import Decimal
from typing import Literal

import msgspec

from ingest import wire

CHECKSUM_LEVELS = 10

Level = tuple[str, str]


class DepthEvent(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One depth event: ``e`` is ``"snapshot"`` (replace your book) or ``"depthUpdate"``.
    ``stale`` is only ever set (true) on a snapshot given while the engine is unreachable."""

    e: Literal["snapshot", "depthUpdate"]
    s: str
    U: int
    u: int
    pu: int
    bids: list[Level]
    asks: list[Level]
    checksum: int
    T: int  # engine time of the snapshot, ms
    stale: bool = False


def checksum(bids: list[Level], asks: list[Level]) -> int:
    """The stream's CRC-32 of the top levels (see the module docstring)."""
    parts: list[str] = []
    for i in range(CHECKSUM_LEVELS):
        if i < len(bids):
            parts += bids[i]
        if i < len(asks):
            parts += asks[i]
    return zlib.crc32(":".join(parts).encode())


def _diff(old: dict[str, str], new: list[Level], descending: bool) -> list[Level]:
    new_map = dict(new)
    changed = [(p, q) for p, q in new if old.get(p) != q]
    changed += [(p, "0") for p in old if p not in new_map]
    changed.sort(key=lambda level: Decimal(level[0]), reverse=descending)
    return changed


class DepthBook:
    """One symbol's book as clients know it, and the diffs that move it."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids: list[Level] = []
        self.asks: list[Level] = []
        self.last_u = 0  # the u of the last event published (0: none yet)
        self.ts = 0
        self._bid_map: dict[str, str] = {}
        self._ask_map: dict[str, str] = {}
        self._update_id = -1  # the engine version of the book held

    def apply(self, snapshot: wire.BookSnapshot) -> DepthEvent | None:
        """Take the engine's next snapshot; returns the event to publish, or None (no change)."""
        if snapshot.update_id == self._update_id:
            return None
        restarted = snapshot.update_id < self._update_id
        first = self._update_id < 0
        bids = [(p, q) for p, q in snapshot.bids]
        asks = [(p, q) for p, q in snapshot.asks]
        if first or restarted:
            event = DepthEvent(
                "snapshot", self.symbol, snapshot.update_id, snapshot.update_id, self.last_u,
                bids, asks, checksum(bids, asks), snapshot.ts,
            )  # fmt: skip
        else:
            bid_diff = _diff(self._bid_map, bids, descending=True)
            ask_diff = _diff(self._ask_map, asks, descending=False)
            event = DepthEvent(
                "depthUpdate", self.symbol, self.last_u + 1, snapshot.update_id, self.last_u,
                bid_diff, ask_diff, checksum(bids, asks), snapshot.ts,
            )  # fmt: skip
        self._update_id = snapshot.update_id
        self.bids, self.asks, self.ts = bids, asks, snapshot.ts
        self._bid_map, self._ask_map = dict(bids), dict(asks)
        if event.e == "depthUpdate" and not event.bids and not event.asks:
            return None  # a new version with the same levels: nothing for clients
        self.last_u = snapshot.update_id
        return event

    @property
    def ready(self) -> bool:
        return self._update_id >= 0

    def top(self) -> tuple[Level | None, Level | None]:
        """The best bid and ask held (None: that side is empty), as the last event left them."""
        return (self.bids[0] if self.bids else None), (self.asks[0] if self.asks else None)

    def snapshot(self, limit: int | None = None) -> DepthEvent:
        """The book clients hold after the last event published (its ``u``)."""
        bids = self.bids if limit is None else self.bids[:limit]
        asks = self.asks if limit is None else self.asks[:limit]
        return DepthEvent(
            "snapshot", self.symbol, self.last_u, self.last_u, self.last_u, bids, asks,
            checksum(self.bids, self.asks), self.ts,
        )  # fmt: skip


class LocalBook:
    """What a client does with the stream: the reference client, used by tests and tools.

    Raises ``ValueError`` on a broken chain (``pu`` not the previous ``u``) or a checksum
    mismatch, which is what a client must treat as "resubscribe".
    """

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.u: int | None = None

    def apply(self, event: DepthEvent) -> None:
        if event.e == "snapshot":
            self.bids, self.asks = dict(event.bids), dict(event.asks)
        else:
            if self.u is None or event.pu != self.u:
                raise ValueError(f"depth gap: pu {event.pu} after u {self.u}")
            for side, levels in ((self.bids, event.bids), (self.asks, event.asks)):
                for price, qty in levels:
                    if Decimal(qty) == 0:
                        side.pop(price, None)
                    else:
                        side[price] = qty
        self.u = event.u
        if checksum(*self.sorted()) != event.checksum:
            raise ValueError(f"depth checksum mismatch at u {event.u}")

    def sorted(self) -> tuple[list[Level], list[Level]]:
        bids = sorted(self.bids.items(), key=lambda lv: Decimal(lv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda lv: Decimal(lv[0]))
        return bids, asks
