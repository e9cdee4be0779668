"""Loss, duplication, reordering and restarts, judged per source."""

from __future__ import annotations

from pushd.feed.sequencing import SequenceTracker, Verdict


def verdicts(tracker: SequenceTracker, frames: list[tuple[int, int, int]]) -> list[str]:
    return [tracker.check(*f, 0.0)[0].value for f in frames]


def test_in_order_then_gap_then_late_and_duplicate() -> None:
    t = SequenceTracker()
    assert verdicts(t, [(1, 5, 1), (1, 5, 2), (1, 5, 3)]) == ["restart", "in_order", "in_order"]
    assert t.check(1, 5, 6, 0.0) == (Verdict.GAP, 2)
    assert t.check(1, 5, 4, 0.0) == (Verdict.LATE, 0)  # arrived after its gap was declared
    assert t.check(1, 5, 4, 0.0) == (Verdict.DUPLICATE, 0)
    assert t.check(1, 5, 6, 0.0) == (Verdict.DUPLICATE, 0)
    assert t.check(1, 5, 7, 0.0) == (Verdict.IN_ORDER, 0)


def test_sources_are_independent() -> None:
    t = SequenceTracker()
    assert verdicts(t, [(1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 1, 3)]) == [
        "restart", "restart", "in_order", "gap",
    ]  # fmt: skip


def test_restart_and_stale_epoch() -> None:
    t = SequenceTracker()
    verdicts(t, [(1, 10, 1), (1, 10, 2)])
    assert t.check(1, 11, 1, 0.0) == (Verdict.RESTART, 0)
    assert t.check(1, 10, 3, 0.0) == (Verdict.STALE, 0)
    assert t.check(1, 11, 2, 0.0) == (Verdict.IN_ORDER, 0)


def test_huge_gap_is_bounded_in_memory() -> None:
    t = SequenceTracker()
    t.check(1, 1, 1, 0.0)
    assert t.check(1, 1, 10**12, 0.0) == (Verdict.JUMP, 0)  # held: the next frame confirms
    assert t.check(1, 1, 10**12 + 1, 0.0) == (Verdict.GAP, 10**12 - 1)
    assert t.check(1, 1, 10**12 - 1, 0.0) == (Verdict.LATE, 0)
    assert t.check(1, 1, 5, 0.0) == (Verdict.DUPLICATE, 0)  # too old to remember: counted as dup


def test_sources_are_bounded_and_the_quiet_ones_forgotten() -> None:
    from pushd.feed.sequencing import MAX_SOURCES

    tracker = SequenceTracker()
    tracker.check(0, 1, 1, 0.0)
    for src in range(1, MAX_SOURCES):
        tracker.check(src, 1, 1, 0.0)
        tracker.check(0, 1, src + 1, 0.0)  # source 0 keeps talking: it is never the oldest
    tracker.check(MAX_SOURCES, 1, 1, 0.0)  # one too many: source 1, silent longest, goes
    assert len(tracker._sources) == MAX_SOURCES
    assert tracker.known(0) and not tracker.known(1)
    assert tracker.check(0, 1, MAX_SOURCES + 1, 0.0) == (Verdict.IN_ORDER, 0)
    assert tracker.check(1, 1, 2, 0.0) == (Verdict.RESTART, 0)  # back: numbering starts over
