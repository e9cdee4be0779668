"""From engine frames to events: authentication, sequence checks, permissions, dispatch. No I/O.

The ingest listeners (UDP, TCP) hand each frame's bytes here (``receive``); this module decides
what is accepted, counts everything, and tells the sink which symbols to resync after a loss.

A frame is believed only once it is *authenticated*: sealed (docs/wire.md) with the key of the
``src`` in its header, sealed within ``replay_window_s`` of this clock, its body's ``src`` the
header's and its epoch not ahead of the clock. Only then does it reach the sequence tracker, so
only a key holder can move a source's epoch or seq. Unsealed frames are taken only with
``allow_unauthenticated`` and only for a ``src`` that has no key. A frame that fails is counted
by reason (``refused``) and never acted on. Private events (and the gaps that may have held
them) are believed only from a source allowed to carry them, and a backend's publishes
(``notice``, ``user_*``) only from a keyed source allowed to publish, under the HTTP API's
channel rules and limits (``pushd.http.owned``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Container, Iterable
from typing import NamedTuple, Protocol

import msgspec

from ingest import wire
from pushd.bus.model import Outgoing
from pushd.errors import ApiError
from pushd.feed.sequencing import MAX_SOURCES, SequenceTracker, Verdict
from pushd.http.owned import backend_message

PrivateEvent = wire.OrderUpdate | wire.BalanceUpdate | wire.PositionUpdate | wire.AccountUpdate


NOT_PERMITTED = "not_permitted"  # the source may not carry such events
PUBLISH_DROPPED = "publish_dropped"  # taken, but the bus dropped it (its outbox is full)
# a publish the HTTP API would refuse, by its status: the ``events`` counter and ack reason
_PUBLISH_REFUSAL = {403: "publish_forbidden", 413: "publish_too_large", 400: "publish_invalid"}


class IngestSink(Protocol):
    def trade(self, trade: wire.Trade) -> None: ...

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def private(self, event: PrivateEvent) -> None: ...

    def publish(self, message: Outgoing) -> bool:
        """A backend's message, checked: to its channel as it is; False when the bus dropped
        it (not published)."""

    def resync(self, symbols: set[str], reason: str) -> None:
        """Events of these symbols may have been lost: rebuild their streams from the engine."""

    def private_gap(self, reason: str) -> None:
        """Private events may have been lost (of any user): their subscribers must be told."""


class Refusal(enum.Enum):
    """Why a frame was not believed (the ``reason`` label of the refused-frames counter)."""

    UNSEALED = "unsealed"  # no seal, where one is required
    UNKNOWN_SOURCE = "unknown_source"  # sealed, but its src has no key here
    BAD_MAC = "bad_mac"  # the tag is not that src's key's: forged, corrupted, or a wrong key
    EXPIRED = "expired"  # sealed longer ago than the replay window (a replay, or a slow clock)
    FUTURE = "future"  # sealed ahead of this clock by more than the replay window
    SRC_MISMATCH = "src_mismatch"  # the body's src is not the header's
    EPOCH_AHEAD = "epoch_ahead"  # an epoch (ns) ahead of this clock: it would silence the source


class Source(msgspec.Struct, frozen=True):
    """What pushd knows of one keyed engine source."""

    key: bytes
    private: bool = False  # may carry private events
    silent_after_s: float = 10.0  # down after this long without a valid frame; 0: never
    backend: bool = False  # may publish what backends own (notice, user_<uid>_<stream>)


class Policy(msgspec.Struct, frozen=True):
    sources: dict[int, Source] = msgspec.field(default_factory=dict)
    allow_unsealed: bool = False  # unsealed frames, from a src without a key
    replay_window_s: float = 30.0
    # a backend publish's data at most: the HTTP API's (``LimitsConfig.publish_max_bytes``)
    publish_max_bytes: int = 64 * 1024


class Received(NamedTuple):
    """What became of one frame's bytes."""

    authenticated: bool  # the sender proved itself: a valid seal (or an allowed unsealed frame)
    verdict: Verdict | None = None  # the sequence verdict, once authenticated and decoded
    refusal: Refusal | None = None
    src: int | None = None  # the source it claimed, when known
    error: str = ""  # a one-line reason for the log (refused, undecodable)
    not_permitted: int = 0  # private events dropped: the source may not carry them
    refused_publishes: int = 0  # publishes refused: not permitted, or not what backends own
    ack: wire.Ack | None = None  # the answer the frame asked for (TCP), once dealt with

    @property
    def quiet(self) -> bool:
        """Taken whole: nothing worth a log line."""
        verdict = self.verdict
        return (
            verdict is not None
            and verdict.accepted
            and not self.not_permitted
            and not self.refused_publishes
        )


class Intake:
    def __init__(
        self, sink: IngestSink, symbols: Container[str], policy: Policy | None = None
    ) -> None:
        self._sink = sink
        self._symbols = symbols
        self.policy = policy if policy is not None else Policy()
        self._keyed = SequenceTracker(max_sources=len(self.policy.sources) + 1)
        self._open = SequenceTracker()  # unsealed sources: at most MAX_SOURCES
        self._symbols_by_source: dict[int, set[str]] = {}
        self._private_sources: set[int] = set()  # unsealed sources that sent private events
        self.frames: Counter[str] = Counter()  # by verdict, plus "bad", "refused"
        self.events: Counter[str] = Counter()  # by event type, plus "unknown_symbol", ...
        self.refused: Counter[tuple[str, str]] = Counter()  # by (transport, reason)
        self.lost_frames = 0
        # per source the trackers know (keyed ones, and at most MAX_SOURCES others: a
        # sender cannot grow these)
        self.source_frames: dict[int, Counter[str]] = {s: Counter() for s in self.policy.sources}
        self.source_lost: Counter[int] = Counter()
        self.bad_frames: Counter[str] = Counter()  # by transport: undecodable, no source
        self._opened_at: float | None = None
        self._accepted_at: dict[int, float] = {}  # keyed source -> when its last frame was
        self._refused_at: dict[int, tuple[float, Refusal]] = {}  # keyed source -> last refusal

    # -- authentication ------------------------------------------------------------------

    def receive(
        self, data: bytes | bytearray | memoryview, transport: str, now: float, wall_ns: int
    ) -> Received:
        """Authenticate, decode, check and dispatch one frame's bytes (a datagram or a TCP
        frame's body). ``now``: a monotonic clock (s); ``wall_ns``: Unix time (ns)."""
        policy = self.policy
        if not wire.is_sealed(data):
            if not policy.allow_unsealed:
                return self._refuse(transport, Refusal.UNSEALED, None, now)
            try:
                envelope = wire.decode(data)
            except wire.WireError as exc:
                return self._bad(transport, str(exc), authenticated=False)
            if envelope.src in policy.sources:  # a key exists: its frames must be sealed
                return self._refuse(transport, Refusal.UNSEALED, envelope.src, now)
        else:
            try:
                header = wire.sealed_header(data)
            except wire.WireError as exc:
                return self._bad(transport, str(exc), authenticated=False)
            src = header.src
            source = policy.sources.get(src)
            if source is None:
                return self._refuse(transport, Refusal.UNKNOWN_SOURCE, src, now)
            body = wire.verify(data, source.key)
            if body is None:
                return self._refuse(transport, Refusal.BAD_MAC, src, now)
            window_ms = policy.replay_window_s * 1000
            age_ms = wall_ns / 1_000_000 - header.sealed_ms
            if age_ms > window_ms:
                return self._refuse(transport, Refusal.EXPIRED, src, now)
            if age_ms < -window_ms:
                return self._refuse(transport, Refusal.FUTURE, src, now)
            try:
                envelope = wire.decode(body)
            except wire.WireError as exc:  # the engine's own bug: its key is sound
                return self._bad(transport, str(exc), authenticated=True, src=src)
            if envelope.src != src:
                return self._refuse(transport, Refusal.SRC_MISMATCH, src, now)
        if envelope.epoch > wall_ns + policy.replay_window_s * 1e9:
            return self._refuse(transport, Refusal.EPOCH_AHEAD, envelope.src, now)
        verdict, _ = self._sequence(envelope, now)
        refused: list[tuple[int, str]] = []
        if verdict.accepted:
            self._dispatch(envelope, now, refused)
        ack = None
        if envelope.ack:
            ack = wire.Ack(envelope.src, envelope.epoch, envelope.seq, verdict.value, refused)
        if not refused:  # the common case, kept cheap (100k+ frames/s)
            return Received(True, verdict, src=envelope.src, ack=ack)
        events = envelope.events
        publishes = sum(isinstance(events[i], wire.Publish) for i, _ in refused)
        return Received(True, verdict, src=envelope.src, not_permitted=len(refused) - publishes,
                        refused_publishes=publishes, ack=ack)  # fmt: skip

    def _refuse(self, transport: str, why: Refusal, src: int | None, now: float) -> Received:
        self.frames["refused"] += 1
        self.refused[transport, why.value] += 1
        if src is not None and src in self.policy.sources:
            self._refused_at[src] = (now, why)
        claimed = "" if src is None else f" (claims source {src})"
        return Received(False, refusal=why, src=src, error=f"refused: {why.value}{claimed}")

    def _bad(
        self, transport: str, error: str, *, authenticated: bool, src: int | None = None
    ) -> Received:
        self.bad_frame(transport)
        return Received(authenticated, src=src, error=error[:200])

    def bad_frame(self, transport: str) -> None:
        self.frames["bad"] += 1
        self.bad_frames[transport] += 1

    # -- sequencing and dispatch ---------------------------------------------------------

    def frame(self, envelope: wire.Envelope, now: float) -> tuple[Verdict, int]:
        """Check and dispatch one authenticated frame; returns the verdict (and frames lost,
        for a gap)."""
        verdict, missing = self._sequence(envelope, now)
        if verdict.accepted:
            self._dispatch(envelope, now)
        return verdict, missing

    def _sequence(self, envelope: wire.Envelope, now: float) -> tuple[Verdict, int]:
        src = envelope.src
        source = self.policy.sources.get(src)
        tracker = self._keyed if source is not None else self._open
        verdict, missing = tracker.check(src, envelope.epoch, envelope.seq, now)
        self.frames[verdict.value] += 1
        by_source = self.source_frames.get(src)
        if by_source is None:  # a new unsealed source: the tracker may have forgotten another
            by_source = self.source_frames[src] = Counter()
            if len(self.source_frames) > MAX_SOURCES + len(self.policy.sources):
                self._forget_sources()  # every per-source table, not only this one
        by_source[verdict.value] += 1
        private = source.private if source is not None else src in self._private_sources
        if verdict is Verdict.GAP:
            self.lost_frames += missing
            self.source_lost[src] += missing
            self._resync_source(src, f"{missing} frame(s) lost from source")
            if private:
                self._sink.private_gap(f"{missing} frame(s) lost from source {src}")
        elif verdict is Verdict.RESTART and src in self._symbols_by_source:
            self._resync_source(src, "source restarted")
            if private:
                self._sink.private_gap(f"source {src} restarted")
        return verdict, missing

    def _dispatch(
        self, envelope: wire.Envelope, now: float, refused: list[tuple[int, str]] | None = None
    ) -> None:
        """The events of an accepted frame to the sink; what is dropped for its source may not
        carry it (``NOT_PERMITTED``), or a publish refused, goes to ``refused`` (index, why)."""
        src = envelope.src
        source = self.policy.sources.get(src)
        refused = [] if refused is None else refused
        if source is not None:
            self._accepted_at[src] = now
        seen = self._symbols_by_source.setdefault(src, set())
        sink = self._sink
        for index, event in enumerate(envelope.events):
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
                    if source is not None and not source.private:
                        self.events[NOT_PERMITTED] += 1
                        refused.append((index, NOT_PERMITTED))
                        continue
                    if source is None:
                        self._private_sources.add(src)
                    sink.private(event)
                case wire.Publish():
                    why = self._publish(event, source)
                    if why:
                        self.events[why] += 1
                        refused.append((index, why))
                        continue
                case wire.Heartbeat():
                    pass
                case _:  # book requests/snapshots belong to the poller's connection
                    self.events["unexpected"] += 1
                    continue
            self.events[type(event).__name__] += 1

    def _publish(self, event: wire.Publish, source: Source | None) -> str:
        """A backend's publish to the sink, if its source may and the HTTP API would take it;
        else why not (an ``events`` counter and the ack's reason)."""
        if source is None or not source.backend:  # unsealed sources never publish
            return NOT_PERMITTED
        try:
            message = backend_message(
                event.channel, event.data, self._symbols, self.policy.publish_max_bytes
            )
        except ApiError as exc:
            return _PUBLISH_REFUSAL.get(exc.status, "publish_invalid")
        return "" if self._sink.publish(message) else PUBLISH_DROPPED

    def _forget_sources(self) -> None:
        keyed = self.policy.sources

        def known(src: int) -> bool:
            return src in keyed or self._open.known(src)

        self._symbols_by_source = {s: v for s, v in self._symbols_by_source.items() if known(s)}
        self._private_sources = {s for s in self._private_sources if known(s)}
        self.source_frames = {s: v for s, v in self.source_frames.items() if known(s)}
        self.source_lost = Counter({s: v for s, v in self.source_lost.items() if known(s)})

    def _resync_source(self, src: int, reason: str) -> None:
        symbols = self._symbols_by_source.get(src)
        if symbols:
            self._sink.resync(set(symbols), reason)

    # -- liveness ------------------------------------------------------------------------

    def open(self, now: float) -> None:
        """The listeners are up: a keyed source's silence counts from now."""
        self._opened_at = now

    def down(self, now: float) -> dict[int, str]:
        """Keyed sources not accepted lately (no valid frame for their ``silent_after_s``),
        each with why; empty before ``open``."""
        if self._opened_at is None:
            return {}
        down: dict[int, str] = {}
        for src, source in self.policy.sources.items():
            if not source.silent_after_s:
                continue
            last = self._accepted_at.get(src)
            quiet = now - (self._opened_at if last is None else last)
            if quiet <= source.silent_after_s:
                continue
            refused = self._refused_at.get(src)
            if refused is not None and (last is None or refused[0] > last):
                down[src] = f"only refused frames ({refused[1].value}) for {quiet:.0f} s"
            elif last is None:
                down[src] = f"not heard from in {quiet:.0f} s"
            else:
                down[src] = f"no valid frame for {quiet:.0f} s"
        return down

    def keyed_sources(self) -> Iterable[int]:
        return self.policy.sources.keys()
