"""The seal, the replay window and sequencing of the engine link, sans-IO: ``Intake.receive``
with the clocks passed in (``now`` monotonic, ``wall_ns`` Unix), no sockets, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import order, trade
from hypothesis import given
from hypothesis import strategies as st

from ingest import wire
from ingest.framing import Framer
from pushd import config as config_mod
from pushd.errors import ConfigError
from pushd.feed.intake import Intake, Policy, Refusal, Source
from pushd.feed.sequencing import CONFLICT_AFTER_S, MAX_SEQ_JUMP, SequenceTracker, Verdict

MARKET_KEY = b"k" * 32
PRIVATE_KEY = b"p" * 40
WALL_NS = 1_764_028_800_000_000_000  # the wall clock of these tests
WALL_MS = WALL_NS // 1_000_000


class Sink:
    """What Intake hands on: every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def trade(self, trade: wire.Trade) -> None:
        self.calls.append(("trade", trade.id))

    def index_price(self, event: wire.IndexPrice) -> None:
        self.calls.append(("index", event.symbol))

    def private(self, event: object) -> None:
        self.calls.append(("private", getattr(event, "order_id", None)))

    def resync(self, symbols: set[str], reason: str) -> None:
        self.calls.append(("resync", frozenset(symbols)))

    def private_gap(self, reason: str) -> None:
        self.calls.append(("private_gap", reason))


def intake(*, allow_unsealed: bool = False, window_s: float = 30.0) -> tuple[Intake, Sink]:
    sink = Sink()
    sources = {
        1: Source(MARKET_KEY, silent_after_s=0),
        2: Source(PRIVATE_KEY, private=True, silent_after_s=5),
    }
    policy = Policy(sources, allow_unsealed=allow_unsealed, replay_window_s=window_s)
    return Intake(sink, {"BTCUSDT"}, policy), sink


def framer(src: int, key: bytes | None, epoch: int = 7, wall_ns: int = WALL_NS) -> Framer:
    return Framer(src, epoch, key, clock=lambda: wall_ns)


def test_a_sealed_frame_is_taken_and_a_forged_one_is_not() -> None:
    got, sink = intake()
    market = framer(1, MARKET_KEY)
    assert got.receive(market.frame([trade(1)]), "udp", 0.0, WALL_NS).verdict is Verdict.RESTART
    forged = framer(1, b"x" * 32)
    forged._seq = 1
    answer = got.receive(forged.frame([trade(2)]), "udp", 0.0, WALL_NS)
    assert (answer.authenticated, answer.refusal, answer.src) == (False, Refusal.BAD_MAC, 1)
    assert got.receive(market.frame([trade(3)]), "udp", 0.0, WALL_NS).verdict is Verdict.IN_ORDER
    assert sink.calls == [("trade", 1), ("trade", 3)]
    assert got.refused == {("udp", "bad_mac"): 1}


@given(st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    """Flip any byte of a sealed frame (header, body or tag): never believed."""
    got, sink = intake()
    frame = bytearray(framer(2, PRIVATE_KEY).frame([order("1001", 1, "filled")]))
    at = data.draw(st.integers(0, len(frame) - 1))
    frame[at] ^= data.draw(st.integers(1, 255))
    answer = got.receive(bytes(frame), "tcp", 0.0, WALL_NS)
    assert answer.verdict is None and sink.calls == []


@pytest.mark.parametrize(
    ("sealed_ms", "refusal"),
    [(WALL_MS - 30_001, Refusal.EXPIRED), (WALL_MS + 30_001, Refusal.FUTURE)],
)
def test_the_replay_window_is_in_wall_time(sealed_ms: int, refusal: Refusal) -> None:
    got, sink = intake()
    body = wire.encode(wire.Envelope(1, 7, 1, [trade(1)]))
    assert (
        got.receive(wire.seal(body, 1, MARKET_KEY, sealed_ms), "udp", 0, WALL_NS).refusal is refusal
    )
    inside = WALL_MS - 29_999 if refusal is Refusal.EXPIRED else WALL_MS + 29_999
    accepted = got.receive(wire.seal(body, 1, MARKET_KEY, inside), "udp", 0, WALL_NS)
    assert accepted.verdict is Verdict.RESTART and sink.calls == [("trade", 1)]


def test_a_replayed_frame_is_a_duplicate_and_does_nothing() -> None:
    got, sink = intake()
    private = framer(2, PRIVATE_KEY)
    first = private.frame([order("1001", 1)])
    second = private.frame([order("1001", 2)])
    verdicts = [got.receive(f, "udp", 0.0, WALL_NS).verdict for f in (first, second, first, second)]
    assert verdicts == [Verdict.RESTART, Verdict.IN_ORDER, Verdict.DUPLICATE, Verdict.DUPLICATE]
    assert sink.calls == [("private", 1), ("private", 2)]


def test_a_seal_needs_the_key_of_its_own_src() -> None:
    """Sealed with source 1's key, claiming (in the body) to be source 2: refused. A sealed
    frame of a source without a key: refused."""
    got, sink = intake()
    body = wire.encode(wire.Envelope(2, 7, 1, [order("1001", 1)]))
    answer = got.receive(wire.seal(body, 1, MARKET_KEY, WALL_MS), "udp", 0.0, WALL_NS)
    assert answer.refusal is Refusal.SRC_MISMATCH
    unknown = wire.seal(wire.encode(wire.Envelope(9, 7, 1, [trade(1)])), 9, b"q" * 32, WALL_MS)
    assert got.receive(unknown, "udp", 0.0, WALL_NS).refusal is Refusal.UNKNOWN_SOURCE
    assert sink.calls == []


def test_unsealed_frames_only_when_allowed_and_never_for_a_keyed_source() -> None:
    strict, strict_sink = intake()
    open_, open_sink = intake(allow_unsealed=True)
    stranger = framer(50, None).frame([order("1001", 1)])
    as_engine = framer(2, None).frame([order("1001", 2)])
    assert strict.receive(stranger, "udp", 0.0, WALL_NS).refusal is Refusal.UNSEALED
    assert open_.receive(stranger, "udp", 0.0, WALL_NS).verdict is Verdict.RESTART
    assert open_.receive(as_engine, "udp", 0.0, WALL_NS).refusal is Refusal.UNSEALED
    assert strict_sink.calls == [] and open_sink.calls == [("private", 1)]
    undecodable = open_.receive(b"\xc1", "udp", 0.0, WALL_NS)
    assert (undecodable.authenticated, open_.frames["bad"]) == (False, 1)


def test_an_epoch_ahead_of_the_clock_is_refused_even_sealed() -> None:
    """An epoch of 2**64-1 would make every later frame of the source stale."""
    got, sink = intake()
    ahead = framer(1, MARKET_KEY, epoch=WALL_NS + 31 * 10**9)
    assert got.receive(ahead.frame([trade(1)]), "udp", 0.0, WALL_NS).refusal is Refusal.EPOCH_AHEAD
    near = framer(1, MARKET_KEY, epoch=WALL_NS + 29 * 10**9)
    assert got.receive(near.frame([trade(2)]), "udp", 0.0, WALL_NS).verdict is Verdict.RESTART
    assert sink.calls == [("trade", 2)]


def test_a_seq_jump_waits_for_a_second_frame_to_agree() -> None:
    t = SequenceTracker()
    assert t.check(1, 1, 1, 0.0) == (Verdict.RESTART, 0)
    assert t.check(1, 1, 2 + MAX_SEQ_JUMP, 0.0) == (Verdict.GAP, MAX_SEQ_JUMP)  # within bound
    base = 2 + MAX_SEQ_JUMP
    assert t.check(1, 1, 2**64 - 1, 0.0) == (Verdict.JUMP, 0)  # a wild seq: held, nothing moves
    assert t.check(1, 1, base + 1, 0.0) == (Verdict.IN_ORDER, 0)  # the real stream goes on
    far = base + 10 * MAX_SEQ_JUMP
    assert t.check(1, 1, far, 0.0) == (Verdict.JUMP, 0)
    assert t.check(1, 1, far + 3, 0.0) == (Verdict.GAP, far + 2 - base - 1)  # agreed: taken
    assert t.check(1, 1, far, 0.0) == (Verdict.LATE, 0)  # the held one was counted as lost


def test_a_second_sender_of_one_source_is_a_conflict_after_the_straggler_time() -> None:
    t = SequenceTracker()
    t.check(1, 10, 1, 0.0)
    t.check(1, 10, 2, 0.0)
    assert t.check(1, 20, 1, 5.0) == (Verdict.RESTART, 0)  # a new run of the source
    assert t.check(1, 10, 3, 5.5) == (Verdict.STALE, 0)  # a straggler of the old run
    assert t.check(1, 10, 2, 5.0 + CONFLICT_AFTER_S + 1) == (Verdict.STALE, 0)  # not advancing
    assert t.check(1, 10, 4, 5.0 + CONFLICT_AFTER_S + 1) == (Verdict.CONFLICT, 0)
    assert t.check(1, 20, 2, 9.0) == (Verdict.IN_ORDER, 0)  # the newest run goes on


def test_private_events_and_their_gaps_only_from_a_permitted_source() -> None:
    got, sink = intake()
    market, private = framer(1, MARKET_KEY), framer(2, PRIVATE_KEY)
    answer = got.receive(market.frame([order("1001", 1), trade(1)]), "udp", 0.0, WALL_NS)
    assert answer.not_permitted == 1
    market.envelope([])  # lost
    got.receive(market.frame([trade(2)]), "udp", 0.0, WALL_NS)
    got.receive(private.frame([order("1001", 2)]), "udp", 0.0, WALL_NS)
    private.envelope([])  # lost
    got.receive(private.frame([order("1001", 3)]), "udp", 0.0, WALL_NS)
    assert sink.calls == [
        ("trade", 1), ("resync", frozenset({"BTCUSDT"})), ("trade", 2), ("private", 2),
        ("private_gap", "1 frame(s) lost from source 2"), ("private", 3),
    ]  # fmt: skip
    assert got.events["not_permitted"] == 1


def test_a_keyed_source_is_down_after_its_silence_and_says_why() -> None:
    got, _ = intake()
    assert got.down(100.0) == {}  # before the listeners open, nothing is expected
    got.open(100.0)
    assert got.down(105.0) == {}
    assert got.down(105.1) == {2: "not heard from in 5 s"}
    got.receive(framer(2, PRIVATE_KEY).frame([wire.Heartbeat()]), "tcp", 106.0, WALL_NS)
    assert got.down(111.0) == {}
    forged = framer(2, b"f" * 32).frame([wire.Heartbeat()])
    got.receive(forged, "tcp", 110.0, WALL_NS)
    assert got.down(111.5) == {2: "only refused frames (bad_mac) for 6 s"}
    assert got.down(111.5).keys() == {2}  # source 1 may be silent (silent_after_s 0 there)
    # a valid frame brings it back at once, for another silent_after_s; and after that, the
    # refusal it outlived is not its reason
    beat = framer(2, PRIVATE_KEY, epoch=8).frame([wire.Heartbeat()])
    assert got.receive(beat, "tcp", 1000.0, WALL_NS).authenticated
    assert got.down(1000.0) == {} and got.down(1005.0) == {}
    assert got.down(1005.1) == {2: "no valid frame for 5 s"}


def test_framer_seals_datagrams_within_the_limit() -> None:
    sealed = framer(1, MARKET_KEY)
    datagrams = sealed.datagrams([trade(i) for i in range(500)], limit=1400)
    assert len(datagrams) > 1 and all(len(d) <= 1400 for d in datagrams)
    got, sink = intake()
    for datagram in datagrams:
        assert got.receive(datagram, "udp", 0.0, WALL_NS).authenticated
    assert [c[1] for c in sink.calls] == list(range(500))
    with pytest.raises(ValueError):
        Framer(1, key=b"short")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("{id = 1}", "ingest.sources.0: set key or key_file (one of them) for source 1"),
        ("{id = 1, key = 'short'}", "ingest.sources.0: the key of source 1 is shorter than 32"),
        ("{id = 1, key = '" + "k" * 32 + "', key_file = 'x'}", "set key or key_file"),
        ("{id = 1, key_file = '/nonexistent/key'}", "ingest.sources.0.key_file: cannot read"),
        ("{id = 1, key = '" + "k" * 32 + "'}, {id = 1, key = '" + "j" * 32 + "'}",
         "ingest.sources: a source id appears twice"),
        ("{id = -1, key = '" + "k" * 32 + "'}", "ingest.sources.0.id: Expected `int` >= 0"),
    ],
)  # fmt: skip
def test_bad_sources_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "pushd.toml"
    path.write_text(f"[ingest]\nsources = [{table}]\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert message in str(info.value)
    assert "k" * 32 not in str(info.value) and "j" * 32 not in str(info.value)


def test_a_key_file_is_read(tmp_path: Path) -> None:
    key = tmp_path / "engine.key"
    key.write_text("  " + "s" * 40 + "\n")
    path = tmp_path / "pushd.toml"
    path.write_text(f"[ingest]\nsources = [{{id = 3, key_file = '{key}', private = true}}]\n")
    config = config_mod.load(path)
    assert config.ingest.key(3) == b"s" * 40 and config.ingest.key(4) is None
    assert config.ingest.sources[0].private


def test_the_example_in_wire_md_is_what_the_code_seals() -> None:
    """docs/wire.md's byte-by-byte example is the one an engine in another language checks its
    sealing against: it must be exactly what ``wire.seal`` makes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "wire.md").read_text()
    block = text.split("### A sealed frame, byte by byte", 1)[1].split("```", 2)[1]
    listed = bytes.fromhex(
        " ".join(line.split("   ")[0] for line in block.splitlines() if line[:2].isalnum())
    )
    body = wire.encode(wire.Envelope(1, 1, 1, [wire.Heartbeat()]))
    assert listed == wire.seal(body, 1, b"0123456789abcdef0123456789abcdef", 1764028800123)


def test_the_first_tcp_frame_is_small_until_the_peer_is_admitted() -> None:
    """A stream decoder for a peer not yet admitted refuses a length over the first frame's
    limit at the prefix, before buffering the body; once admitted, the limit is the frame's."""
    first = wire.frame_tcp(wire.Envelope(1, 1, 1, [wire.Heartbeat()]))
    big = wire.frame_tcp(wire.Envelope(1, 1, 2, [trade(i) for i in range(1, 2001)]))
    assert wire.MAX_FIRST_FRAME_BYTES < len(big) <= wire.MAX_FRAME_BYTES
    stranger = wire.StreamDecoder(max_frame=wire.MAX_FIRST_FRAME_BYTES)
    stranger.feed(big[:4])  # the length alone: refused, nothing more need arrive
    with pytest.raises(wire.WireError):
        stranger.next_body()
    engine = wire.StreamDecoder(max_frame=wire.MAX_FIRST_FRAME_BYTES)
    engine.feed(first)
    assert engine.next_body() == first[4:]
    engine.max_frame = wire.MAX_FRAME_BYTES  # admitted
    engine.feed(big)
    assert engine.next_body() == big[4:]
