"""Per-source frame numbering checks: loss, duplication, reordering, restarts. No I/O.

Every engine frame carries ``(src, epoch, seq)``. For each source pushd expects ``seq`` to rise by
one. It does not wait for reordered datagrams: a frame arriving after a later one was accepted
has already been declared lost (a gap, which resyncs the affected streams) and is dropped as
*late*. A repeated ``seq`` is a *duplicate* and dropped: within a run this is the replay window.
A higher ``epoch`` means the source restarted: numbering begins again and its streams are
resynced. A lower epoch is a straggler of the previous run and is dropped as *stale*; a lower
epoch that keeps advancing more than ``CONFLICT_AFTER_S`` after the restart is a second sender
using the same source id (*conflict*, dropped too, and counted so that it is not silent).

A forward jump longer than ``MAX_SEQ_JUMP`` moves nothing by itself (*jump*, held): one frame
with a wild ``seq`` (a bug, even from a source with a valid key) would otherwise make every
later real frame a duplicate. The jump is taken when a second frame agrees with it (lands
within ``MAX_SEQ_JUMP`` after it); that second frame is a gap that counts the held one as lost.
"""

from __future__ import annotations

import enum
from collections import deque

MISSING_REMEMBERED = 1024  # lost seqs remembered per source, to tell late from duplicate
MAX_SEQ_JUMP = MISSING_REMEMBERED  # a longer jump must be confirmed by the next frame
MAX_SOURCES = 256  # sources tracked; beyond, the one heard from longest ago is forgotten
# worst case held: MAX_SOURCES x MISSING_REMEMBERED lost seqs, about 26 MB at ~100 B each
CONFLICT_AFTER_S = 1.0  # stragglers of a previous run arrive within this of its successor


class Verdict(enum.Enum):
    IN_ORDER = "in_order"
    GAP = "gap"  # accepted, after ``missing`` lost frames
    RESTART = "restart"  # accepted: first frame of a new epoch (or of a new source)
    DUPLICATE = "duplicate"
    LATE = "late"
    STALE = "stale"
    JUMP = "jump"  # held: a seq jump over MAX_SEQ_JUMP, not (yet) confirmed
    CONFLICT = "conflict"  # dropped: an older epoch still sending, as a second sender

    @property
    def accepted(self) -> bool:
        return self in (Verdict.IN_ORDER, Verdict.GAP, Verdict.RESTART)


class _Source:
    __slots__ = ("epoch", "jump", "missing", "missing_order", "next_seq", "old_epoch",
                 "old_seq", "since")  # fmt: skip

    def __init__(self, epoch: int, seq: int, now: float) -> None:
        self.epoch = epoch
        self.next_seq = seq + 1
        self.since = now  # when this epoch began here
        self.jump = 0  # a held seq jump, 0: none
        self.old_epoch = -1  # the last older epoch heard from, and its highest seq
        self.old_seq = 0
        self.missing: set[int] = set()
        self.missing_order: deque[int] = deque()


class SequenceTracker:
    def __init__(self, max_sources: int = MAX_SOURCES) -> None:
        self._sources: dict[int, _Source] = {}
        self._max_sources = max_sources

    def known(self, src: int) -> bool:
        return src in self._sources

    def check(self, src: int, epoch: int, seq: int, now: float) -> tuple[Verdict, int]:
        """Judge one frame at time ``now`` (seconds, any monotonic clock); returns the verdict
        and, for a GAP, how many frames were lost.

        At most ``max_sources`` sources are remembered (the dict is kept in order of last
        frame): a forgotten source's next frame is a RESTART, which resyncs what it feeds."""
        sources = self._sources
        state = sources.pop(src, None)
        if state is None or epoch > state.epoch:
            if len(sources) >= self._max_sources:
                del sources[next(iter(sources))]
            new = sources[src] = _Source(epoch, seq, now)
            if state is not None:
                new.old_epoch, new.old_seq = state.epoch, state.next_seq - 1
            return Verdict.RESTART, 0
        sources[src] = state  # now the most recently heard from
        if epoch < state.epoch:
            return self._older(state, epoch, seq, now), 0
        if seq == state.next_seq:
            state.next_seq = seq + 1
            state.jump = 0
            return Verdict.IN_ORDER, 0
        if seq > state.next_seq:
            missing = seq - state.next_seq
            if missing > MAX_SEQ_JUMP and not 0 < seq - state.jump <= MAX_SEQ_JUMP:
                state.jump = seq
                return Verdict.JUMP, 0
            for lost in range(state.next_seq, seq)[-MISSING_REMEMBERED:]:
                state.missing.add(lost)
                state.missing_order.append(lost)
            while len(state.missing_order) > MISSING_REMEMBERED:
                state.missing.discard(state.missing_order.popleft())
            state.next_seq = seq + 1
            state.jump = 0
            return Verdict.GAP, missing
        if seq in state.missing:
            state.missing.discard(seq)
            return Verdict.LATE, 0
        return Verdict.DUPLICATE, 0

    @staticmethod
    def _older(state: _Source, epoch: int, seq: int, now: float) -> Verdict:
        """A frame of an epoch before the current one: a straggler, or a second sender."""
        if epoch > state.old_epoch:
            state.old_epoch, state.old_seq = epoch, seq
        elif epoch == state.old_epoch and seq > state.old_seq:
            state.old_seq = seq  # that run is still numbering frames
            if now - state.since > CONFLICT_AFTER_S:
                return Verdict.CONFLICT
        return Verdict.STALE
