"""From engine frames to events: sequence checks, symbol checks, dispatch. No I/O.

The ingest listeners (UDP, TCP) decode frames and hand them here; this module decides what is
accepted, counts everything, and tells the sink which symbols to resync after a loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from typing import Protocol

from ingest import wire
from pushd.feed.sequencing import MAX_SOURCES, SequenceTracker, Verdict

PrivateEvent = wire.OrderUpdate | wire.BalanceUpdate | wire.PositionUpdate | wire.AccountUpdate


class IngestSink(Protocol):
    def trade(self, trade: wire.Trade) -> None: ...

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def private(self, event: PrivateEvent) -> None: ...

    def resync(self, symbols: set[str], reason: str) -> None:
        """Events of these symbols may have been lost: rebuild their streams from the engine."""

    def private_gap(self, reason: str) -> None:
        """Private events may have been lost (of any user): their subscribers must be told."""


class Intake:
    def __init__(self, sink: IngestSink, symbols: Container[str]) -> None:
        self._sink = sink
        self._symbols = symbols
        self._tracker = SequenceTracker()
        self._symbols_by_source: dict[int, set[str]] = {}
        self._private_sources: set[int] = set()  # sources that have sent private events
        self.frames: Counter[str] = Counter()  # by verdict, plus "bad"
        self.events: Counter[str] = Counter()  # by event type, plus "unknown_symbol", ...
        self.lost_frames = 0
        # per source the tracker knows (at most MAX_SOURCES: a sender cannot grow these)
        self.source_frames: dict[int, Counter[str]] = {}  # by verdict
        self.source_lost: Counter[int] = Counter()
        self.bad_frames: Counter[str] = Counter()  # by transport: undecodable, no source

    def bad_frame(self, transport: str) -> None:
        self.frames["bad"] += 1
        self.bad_frames[transport] += 1

    def frame(self, envelope: wire.Envelope) -> tuple[Verdict, int]:
        """Check and dispatch one frame; returns the verdict (and frames lost, for a gap)."""
        verdict, missing = self._tracker.check(envelope.src, envelope.epoch, envelope.seq)
        self.frames[verdict.value] += 1
        by_source = self.source_frames.get(envelope.src)
        if by_source is None:  # a new source: the tracker may have forgotten another
            by_source = self.source_frames[envelope.src] = Counter()
            if len(self.source_frames) > MAX_SOURCES:
                self._forget_sources()  # every per-source table, not only this one
        by_source[verdict.value] += 1
        if verdict is Verdict.GAP:
            self.lost_frames += missing
            self.source_lost[envelope.src] += missing
            self._resync_source(envelope.src, f"{missing} frame(s) lost from source")
            if envelope.src in self._private_sources:
                self._sink.private_gap(f"{missing} frame(s) lost from source {envelope.src}")
        elif verdict is Verdict.RESTART and envelope.src in self._symbols_by_source:
            self._resync_source(envelope.src, "source restarted")
            if envelope.src in self._private_sources:
                self._sink.private_gap(f"source {envelope.src} restarted")
        if not verdict.accepted:
            return verdict, missing
        seen = self._symbols_by_source.setdefault(envelope.src, set())
        sink = self._sink
        for event in envelope.events:
            symbol = getattr(event, "symbol", None)
            if symbol is not None and symbol not in self._symbols:
                self.events["unknown_symbol"] += 1
                continue
            match event:
                case wire.Trade():
                    seen.add(event.symbol)
                    sink.trade(event)
                case wire.IndexPrice():
                    sink.index_price(event)
                case (
                    wire.OrderUpdate()
                    | wire.BalanceUpdate()
                    | wire.PositionUpdate()
                    | (wire.AccountUpdate())
                ):
                    self._private_sources.add(envelope.src)
                    sink.private(event)
                case _:  # book requests/snapshots belong to the poller's connection
                    self.events["unexpected"] += 1
                    continue
            self.events[type(event).__name__] += 1
        return verdict, missing

    def _forget_sources(self) -> None:
        known = self._tracker.known
        self._symbols_by_source = {s: v for s, v in self._symbols_by_source.items() if known(s)}
        self._private_sources = {s for s in self._private_sources if known(s)}
        self.source_frames = {s: v for s, v in self.source_frames.items() if known(s)}
        self.source_lost = Counter({s: v for s, v in self.source_lost.items() if known(s)})

    def _resync_source(self, src: int, reason: str) -> None:
        symbols = self._symbols_by_source.get(src)
        if symbols:
            self._sink.resync(set(symbols), reason)
