"""The engine wire format: every event round-trips; TCP framing survives any split."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import wire
from ingest.framing import Framer, pack_datagrams

decimals = st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{1,8})?", fullmatch=True)
symbols = st.sampled_from(["BTCUSDT", "ETHUSDT", "SOLUSDT"])
uids = st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.\-]{0,10}", fullmatch=True)
ms = st.integers(0, 2**41)
ids = st.integers(0, 2**63 - 1)
sides = st.sampled_from(["buy", "sell"])
levels = st.lists(st.tuples(decimals, decimals), max_size=5)

events = st.one_of(
    st.builds(wire.Trade, symbols, ids, decimals, decimals, sides, ms),
    st.builds(
        wire.OrderUpdate,
        uids,
        symbols,
        ids,
        sides,
        st.sampled_from(["limit", "market"]),
        decimals,
        decimals,
        decimals,
        decimals,
        st.sampled_from(["new", "partially_filled", "filled", "canceled", "rejected"]),
        ms,
        st.text(max_size=8),
        decimals,
        decimals,
        decimals,
    ),
    st.builds(
        wire.BalanceUpdate,
        uids,
        st.sampled_from(["USDT", "BTC"]),
        decimals,
        decimals,
        st.sampled_from(["order", "fill", "cancel", "funding", "transfer", "fee"]),
        ms,
    ),
    st.builds(wire.PositionUpdate, uids, symbols, decimals, decimals, decimals, ms),
    st.builds(
        wire.AccountUpdate,
        uids,
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        ms,
    ),
    st.builds(wire.IndexPrice, symbols, st.text(max_size=8), decimals, ms),
    st.builds(wire.BookRequest, symbols, ids, st.integers(1, 5000)),
    st.builds(wire.BookSnapshot, symbols, ids, ids, levels, levels, ms),
)
envelopes = st.builds(
    wire.Envelope, st.integers(0, 2**32 - 1), st.integers(0, 2**63), st.integers(1, 2**63),
    st.lists(events, min_size=1, max_size=6),
)  # fmt: skip


@given(envelopes)
def test_every_event_round_trips(envelope: wire.Envelope) -> None:
    assert wire.decode(wire.encode(envelope)) == envelope


@given(st.lists(envelopes, min_size=1, max_size=4), st.data())
@settings(max_examples=50)
def test_tcp_stream_split_anywhere(frames: list[wire.Envelope], data: st.DataObject) -> None:
    stream = b"".join(wire.frame_tcp(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = wire.StreamDecoder()
    out: list[wire.Envelope] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == frames and decoder.buffered == 0


def test_split_at_every_byte_boundary() -> None:
    framer = Framer(src=3, epoch=9)
    trade = wire.Trade("BTCUSDT", 1, "65000.1", "0.001", "buy", 1)
    stream = framer.tcp_frame([trade]) + framer.tcp_frame([trade, trade])
    for cut in range(len(stream) + 1):
        decoder = wire.StreamDecoder()
        decoder.feed(stream[:cut])
        got = []
        while (frame := decoder.next_frame()) is not None:
            got.append(frame.seq)
        decoder.feed(stream[cut:])
        while (frame := decoder.next_frame()) is not None:
            got.append(frame.seq)
        assert got == [1, 2], cut


def test_bad_frame_body_is_skipped_but_bad_length_breaks_the_stream() -> None:
    good = Framer(1).tcp_frame([wire.Trade("BTCUSDT", 1, "1", "1", "buy", 1)])
    junk = b"\xc1\xc1\xc1"
    decoder = wire.StreamDecoder()
    decoder.feed(wire.LENGTH_PREFIX.pack(len(junk)) + junk + good)
    with pytest.raises(wire.WireError):
        decoder.next_frame()
    assert decoder.next_frame() is not None and not decoder.broken
    decoder.feed(wire.LENGTH_PREFIX.pack(wire.MAX_FRAME_BYTES + 1) + good)
    for _ in range(2):
        with pytest.raises(wire.WireError):
            decoder.next_frame()
    assert decoder.broken


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x81",  # truncated map
        msgspec.msgpack.encode({"src": 1, "epoch": 1, "seq": 1, "events": []}),
        msgspec.msgpack.encode({"src": 1, "epoch": 1, "seq": 0, "events": [{"type": "trade"}]}),
        msgspec.msgpack.encode(
            {
                "src": 1,
                "epoch": 1,
                "seq": 1,
                "events": [
                    {
                        "type": "trade",
                        "symbol": "BTCUSDT",
                        "id": 1,
                        "price": 1.5,
                        "qty": "1",
                        "side": "buy",
                        "ts": 1,
                    }
                ],
            }
        ),
        msgspec.msgpack.encode(
            {
                "src": 1,
                "epoch": 1,
                "seq": 1,
                "events": [
                    {
                        "type": "trade",
                        "symbol": "BTCUSDT",
                        "id": 1,
                        "price": "1e5",
                        "qty": "1",
                        "side": "buy",
                        "ts": 1,
                    }
                ],
            }
        ),
        msgspec.msgpack.encode({"src": 1, "epoch": 1, "seq": 1, "events": [{"type": "nope"}]}),
        msgspec.msgpack.encode([1, 2, 3]),
    ],
)
def test_invalid_frames_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(payload)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode(data)


def test_datagram_packing_respects_the_limit() -> None:
    trade = wire.Trade("BTCUSDT", 123456, "65000.1", "0.001", "buy", 1_700_000_000_000)
    events: list[wire.Event] = [trade] * 1000
    framer = Framer(src=1, epoch=1)
    datagrams = framer.datagrams(events, limit=1400)
    assert all(len(d) <= 1400 for d in datagrams)
    decoded = [wire.decode(d) for d in datagrams]
    assert [d.seq for d in decoded] == list(range(1, len(datagrams) + 1))
    assert sum(len(d.events) for d in decoded) == 1000
    one = len(wire.encode_event(trade))
    assert all(len(d) > 1400 - 2 * one for d in datagrams[:-1])  # packed full, not one per event
    big = wire.BookSnapshot("BTCUSDT", 1, 1, [("1", "1")] * 5000, [], 1)
    with pytest.raises(wire.WireError):
        pack_datagrams([big], limit=1400)


def test_a_frame_nested_past_the_depth_limit_is_a_wire_error() -> None:
    # an unknown key's value is skipped by the decoder, but still nested: RecursionError
    body = b"\x82" + msgspec.msgpack.encode("src") + b"\x01" + msgspec.msgpack.encode("zz")
    with pytest.raises(wire.WireError, match="nested too deep"):
        wire.decode(body + b"\x91" * 5000 + b"\x00")
