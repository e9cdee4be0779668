"""Per-source frame numbering checks: loss, duplication, reordering, restarts. No I/O.

Every engine frame carries ``(src, epoch, seq)``. For each source pushd expects ``seq`` to rise by
one. It does not wait for reordered datagrams: a frame arriving after a later one was accepted
has already been declared lost (a gap, which resyncs the affected streams) and is dropped as
*late*. A repeated ``seq`` is a *duplicate* and dropped. A higher ``epoch`` means the source
restarted: numbering begins again and its streams are resynced. A lower epoch is a straggler of
the previous run and is dropped as *stale*.
"""

from __future__ import annotations

import enum
from collections import deque

MISSING_REMEMBERED = 1024  # lost seqs remembered per source, to tell late from duplicate
MAX_SOURCES = 256  # sources tracked; beyond, the one heard from longest ago is forgotten
# worst case held: MAX_SOURCES x MISSING_REMEMBERED lost seqs, about 26 MB at ~100 B each


class Verdict(enum.Enum):
    IN_ORDER = "in_order"
    GAP = "gap"  # accepted, after ``missing`` lost frames
    RESTART = "restart"  # accepted: first frame of a new epoch (or of a new source)
    DUPLICATE = "duplicate"
    LATE = "late"
    STALE = "stale"

    @property
    def accepted(self) -> bool:
        return self in (Verdict.IN_ORDER, Verdict.GAP, Verdict.RESTART)


class _Source:
    __slots__ = ("epoch", "missing", "missing_order", "next_seq")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch = epoch
        self.next_seq = seq + 1
        self.missing: set[int] = set()
        self.missing_order: deque[int] = deque()


class SequenceTracker:
    def __init__(self) -> None:
        self._sources: dict[int, _Source] = {}

    def known(self, src: int) -> bool:
        return src in self._sources

    def check(self, src: int, epoch: int, seq: int) -> tuple[Verdict, int]:
        """Judge one frame; returns the verdict and, for a GAP, how many frames were lost.

        At most ``MAX_SOURCES`` sources are remembered (the dict is kept in order of last
        frame): a forgotten source's next frame is a RESTART, which resyncs what it feeds."""
        sources = self._sources
        state = sources.pop(src, None)
        if state is None or epoch > state.epoch:
            if len(sources) >= MAX_SOURCES:
                del sources[next(iter(sources))]
            sources[src] = _Source(epoch, seq)
            return Verdict.RESTART, 0
        sources[src] = state  # now the most recently heard from
        if epoch < state.epoch:
            return Verdict.STALE, 0
        if seq == state.next_seq:
            state.next_seq = seq + 1
            return Verdict.IN_ORDER, 0
        if seq > state.next_seq:
            missing = seq - state.next_seq
            for lost in range(state.next_seq, seq)[-MISSING_REMEMBERED:]:
                state.missing.add(lost)
                state.missing_order.append(lost)
            while len(state.missing_order) > MISSING_REMEMBERED:
                state.missing.discard(state.missing_order.popleft())
            state.next_seq = seq + 1
            return Verdict.GAP, missing
        if seq in state.missing:
            state.missing.discard(seq)
            return Verdict.LATE, 0
        return Verdict.DUPLICATE, 0
