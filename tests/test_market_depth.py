"""Depth stream: a client applying snapshot + diffs always holds exactly the engine's book."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest import wire
from pushd.market.depth import DepthBook, LocalBook, checksum


def price(ticks: int) -> str:
    return f"{ticks // 10}.{ticks % 10}" if ticks % 10 else str(ticks // 10)


levels = st.dictionaries(st.integers(1, 60), st.integers(1, 9), max_size=25)


@st.composite
def books(draw: st.DrawFn) -> wire.BookSnapshot:
    bids = draw(levels)
    asks = draw(levels)
    return wire.BookSnapshot(
        "BTCUSDT", 0, 0,
        [(price(t), str(q)) for t, q in sorted(bids.items(), reverse=True)],
        [(price(t + 60), f"{q}.5") for t, q in sorted(asks.items())],
        0,
    )  # fmt: skip


def versioned(snapshots: list[wire.BookSnapshot], bumps: list[int]) -> list[wire.BookSnapshot]:
    """The engine's view: a book changes only with a new version (bump 0 repeats the last)."""
    out, version = [], 0
    for snap, bump in zip(snapshots, bumps, strict=False):
        version += bump
        levels = snap if bump or not out else out[-1]
        out.append(wire.BookSnapshot(snap.symbol, 0, version, levels.bids, levels.asks, version))
    return out


@given(st.lists(books(), min_size=1, max_size=30), st.lists(st.integers(0, 3), min_size=30))
def test_snapshot_then_diffs_rebuild_the_engines_book(
    snapshots: list[wire.BookSnapshot], bumps: list[int]
) -> None:
    book = DepthBook("BTCUSDT")
    early, late = LocalBook(), None
    for i, snap in enumerate(versioned(snapshots, bumps)):
        event = book.apply(snap)
        if event is not None:
            early.apply(event)  # raises on a broken chain or a checksum mismatch
            if late is not None:
                late.apply(event)
        if (
            i == len(snapshots) // 2 and book.ready
        ):  # someone subscribes mid-stream: snapshot, then diffs
            late = LocalBook()
            late.apply(book.snapshot())
        if book.ready:
            assert early.sorted() == (list(snap.bids), list(snap.asks))
            if late is not None:
                assert late.sorted() == (list(snap.bids), list(snap.asks))


def snap(
    version: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]], _ts: int = 0
) -> wire.BookSnapshot:
    return wire.BookSnapshot("BTCUSDT", 0, version, bids, asks, 0)


def test_diff_lists_only_changed_levels_with_zero_for_removed() -> None:
    book = DepthBook("BTCUSDT")
    first = book.apply(snap(5, [("10", "1"), ("9", "2")], [("11", "1")], 0))
    assert first is not None and first.e == "snapshot" and first.u == 5
    diff = book.apply(snap(8, [("10", "1"), ("8", "3")], [("11", "4")], 0))
    assert diff is not None and diff.e == "depthUpdate"
    assert (diff.U, diff.u, diff.pu) == (6, 8, 5)
    assert diff.bids == [("9", "0"), ("8", "3")]
    assert diff.asks == [("11", "4")]
    # same version again: nothing; a new version with the same levels: nothing either
    assert book.apply(snap(8, [("10", "1")], [], 0)) is None
    assert book.apply(snap(9, [("10", "1"), ("8", "3")], [("11", "4")], 0)) is None
    nxt = book.apply(snap(12, [("10", "2"), ("8", "3")], [("11", "4")], 0))
    assert nxt is not None and (nxt.U, nxt.u, nxt.pu) == (9, 12, 8)


def test_engine_restart_sends_a_full_snapshot() -> None:
    book = DepthBook("BTCUSDT")
    book.apply(snap(100, [("10", "1")], [("11", "1")], 0))
    event = book.apply(snap(3, [("10", "2")], [("12", "1")], 0))
    assert event is not None and event.e == "snapshot"
    assert event.bids == [("10", "2")] and event.u == 3


def test_checksum_is_documented_crc32() -> None:
    bids = [("10", "1"), ("9", "2")]
    asks = [("11", "3")]
    assert checksum(bids, asks) == zlib.crc32(b"10:1:11:3:9:2")


def test_local_book_rejects_a_gap() -> None:
    book = DepthBook("BTCUSDT")
    client = LocalBook()
    first = book.apply(snap(1, [("10", "1")], [], 0))
    book.apply(snap(2, [("10", "2")], [], 0))  # lost to the client
    third = book.apply(snap(3, [("10", "3")], [], 0))
    assert first is not None and third is not None
    client.apply(first)
    with pytest.raises(ValueError, match="gap"):
        client.apply(third)
