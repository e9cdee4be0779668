"""Fuzzing the authenticated engine link: sealed and unsealed frames, forged, mutated, replayed.

Two levels. Sans-IO (``Intake.receive``, thousands of cases): an honest source's frames,
interleaved with whatever a stranger without its key can send, are all taken, in order, and
nothing else ever reaches the sink. Over real sockets, against a real ``pushd run`` that takes
sealed frames only: datagrams and TCP streams of every kind (including frames validly sealed
for a fuzzing source, with wild epochs, seqs and events); the daemon stays up with no internal
error and bounded RSS (``test_fuzz.Surface``), and the honest source's numbering never moved.

``PUSHD_FUZZ_EXAMPLES`` sets the cases of the socket surfaces (as in test_fuzz.py); the
sans-IO property runs ``SANS_IO_EXAMPLES`` (3x that) cases.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import PUBLISH_TOKEN, SECRET, order, trade
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scrape import Scrape
from test_fuzz import ENVELOPES, EXAMPLES, FUZZ, Daemon, Surface, end, spawn_daemon

from ingest import wire
from ingest.framing import Framer
from pushd.feed.intake import Intake, Policy, Source

HONEST_KEY = b"honest-source-key-of-the-fuzz-tests!"
FUZZ_KEY = b"fuzzing-source-key-the-fuzzer-holds!"  # source 3: valid seals, wild content
WALL_NS = 1_764_028_800_000_000_000
SANS_IO_EXAMPLES = int(os.environ.get("PUSHD_FUZZ_SANS_IO_EXAMPLES", str(3 * EXAMPLES)))
STRANGER_IDS = 1_000_000  # order/trade ids at or above this are the stranger's


class Sink:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.private_gaps = 0

    def trade(self, trade: wire.Trade) -> None:
        self.ids.append(trade.id)

    def index_price(self, event: wire.IndexPrice) -> None: ...

    def private(self, event: object) -> None:
        self.ids.append(getattr(event, "order_id", -1))

    def resync(self, symbols: set[str], reason: str) -> None: ...

    def private_gap(self, reason: str) -> None:
        self.private_gaps += 1


def stranger_frame(draw: st.DrawFn, honest: list[bytes]) -> bytes:
    """Anything someone without the honest key can send: junk, unsealed envelopes, forged
    seals, honest frames mutated or cut, replays of honest frames already delivered."""
    src = draw(st.sampled_from([2, 1, 50, 0, 2**32 - 1]))
    epoch = draw(st.sampled_from([0, 1, WALL_NS - 10**9, WALL_NS, 2**63, 2**64 - 1]))
    seq = draw(st.sampled_from([1, 2, 3, 1000, 10**6, 2**63, 2**64 - 1]))
    event = draw(st.sampled_from([
        order("1001", STRANGER_IDS + 1, "filled"), trade(STRANGER_IDS + 2), wire.Heartbeat(),
    ]))  # fmt: skip
    body = wire.encode(wire.Envelope(src, epoch, seq, [event]))
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return body
    if kind == 2:  # a seal with a key of its own
        key = draw(st.sampled_from([b"x" * 32, HONEST_KEY[:-1] + b"?", FUZZ_KEY]))
        return wire.seal(body, src, key, WALL_NS // 10**6)
    if kind == 3:  # a forged tag, any bytes
        header = wire.SEAL_HEADER.pack(wire.SEAL_MAGIC, src, WALL_NS // 10**6)
        return header + body + draw(st.binary(min_size=32, max_size=32))
    if not honest:
        return body
    frame = bytearray(draw(st.sampled_from(honest)))
    if kind == 4:  # a flipped byte
        at = draw(st.integers(0, len(frame) - 1))
        frame[at] ^= draw(st.integers(1, 255))
    elif kind == 5:  # cut short
        del frame[draw(st.integers(0, len(frame) - 1)) :]
    return bytes(frame)  # kind 6: a replay


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """An honest source's frames (some lost on the way) among a stranger's."""
    framer = Framer(2, epoch=WALL_NS - 5 * 10**9, key=HONEST_KEY, clock=lambda: WALL_NS)
    delivered: list[bytes] = []
    steps: list[tuple[str, bytes]] = []
    next_id = 1
    for _ in range(draw(st.integers(1, 30))):
        what = draw(st.sampled_from(["honest", "honest", "lost", "stranger", "stranger"]))
        if what == "stranger":
            steps.append(("stranger", stranger_frame(draw, delivered)))
            continue
        frame = framer.frame([order("1001", next_id)])
        next_id += 1
        if what == "honest":
            delivered.append(frame)
            steps.append(("honest", frame))
    return steps


@settings(max_examples=SANS_IO_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(traffic())
def test_a_stranger_changes_nothing_for_the_honest_source(steps: list[tuple[str, bytes]]) -> None:
    sink = Sink()
    policy = Policy({2: Source(HONEST_KEY, private=True), 1: Source(b"m" * 32)})
    intake = Intake(sink, {"BTCUSDT"}, policy)
    honest_ids: list[int] = []
    for who, frame in steps:
        got = intake.receive(frame, "udp", 0.0, WALL_NS)
        if who == "honest":
            assert got.verdict is not None and got.verdict.accepted, got
            honest_ids.append(msgspec.msgpack.decode(frame[16:-32])["events"][0]["order_id"])
        else:
            assert got.verdict is None or not got.verdict.accepted, got
    assert sink.ids == honest_ids  # the honest events, each once, in order; nothing else
    gaps = intake.source_frames[2]["gap"]
    assert sink.private_gaps == gaps  # only the honest source's real losses told subscribers


# -- over real sockets ---------------------------------------------------------------------


def run_sealed_daemon(tmp: Path) -> Iterator[Daemon]:
    """A real ``pushd run`` taking sealed frames only: source 1 (the honest one), source 3
    (whose key the fuzzer holds)."""
    yield from spawn_daemon(
        tmp,
        (
            "[websocket]\nport = 0\n[http]\nport = 0\n"
            f"publish_token = '{PUBLISH_TOKEN}'\n[auth.hmac]\nsecret = '{SECRET}'\n"
            f"[engine]\nsnapshot_enabled = false\n"
            "[ingest]\nudp_port = 0\ntcp_port = 0\n"
            "auth_timeout_s = 1.0\n"
            f"sources = [{{id = 1, key = '{HONEST_KEY.decode()}', private = true,"
            " silent_after_s = 0},"
            f" {{id = 3, key = '{FUZZ_KEY.decode()}', private = true, silent_after_s = 0}}]\n"
            "[log]\nformat = 'json'\nlevel = 'info'\n"
        ),
    )


@pytest.fixture(scope="module")
def sealed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from run_sealed_daemon(tmp_path_factory.mktemp("fuzz-sealed"))


def fuzz_sealed(envelope: dict[str, object], sealed_ms: int) -> bytes:
    """A wild envelope with a valid seal of source 3 (the header names 3, the body any src)."""
    return wire.seal(msgspec.msgpack.encode(envelope), 3, FUZZ_KEY, sealed_ms)


FRAMES = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=100).map(lambda b: wire.SEAL_MAGIC + b),
    ENVELOPES.map(lambda e: msgspec.msgpack.encode(e)),
    st.builds(fuzz_sealed, ENVELOPES,
              st.sampled_from([0, time.time_ns() // 10**6, 2**64 - 1])),
    st.builds(lambda e, key: wire.seal(msgspec.msgpack.encode(e), 1, key, time.time_ns() // 10**6),
              ENVELOPES, st.sampled_from([b"x" * 32, FUZZ_KEY])),
)  # fmt: skip


class Honest:
    """Source 1's frames, before and after each surface: each must be the next in order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.framer = Framer(1, key=HONEST_KEY)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sent = 0

    def send(self) -> None:
        self.sent += 1
        frame = self.framer.frame([trade(self.sent)])
        self.sock.sendto(frame, ("127.0.0.1", self.daemon.udp))

    def verdicts(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.http}/metrics").read()
        samples = Scrape(text.decode()).samples("pushd_ingest_source_frames_total", source="1")
        return {labels["verdict"]: value for labels, value in samples}

    def check_in_order(self) -> None:
        """Every frame sent so far was taken in order: no fuzz frame moved the numbering."""
        deadline = time.monotonic() + 10
        while sum(self.verdicts().values()) < self.sent:  # UDP: read when the daemon can
            assert time.monotonic() < deadline, self.verdicts()
            time.sleep(0.05)
        assert self.verdicts() == {"restart": 1, "in_order": self.sent - 1}


@pytest.fixture(scope="module")
def honest(sealed_daemon: Daemon) -> Honest:
    return Honest(sealed_daemon)


def test_sealed_ingest_udp_fuzz(sealed_daemon: Daemon, honest: Honest) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    honest.send()

    @FUZZ
    @given(FRAMES)
    def case(datagram: bytes) -> None:
        surface.case()
        if len(datagram) <= wire.MAX_DATAGRAM_BYTES:
            sock.sendto(datagram, ("127.0.0.1", sealed_daemon.udp))

    with Surface(sealed_daemon, "ingest_sealed_udp") as surface:
        case()
        honest.send()
        honest.check_in_order()
    sock.close()


def test_sealed_ingest_tcp_fuzz(sealed_daemon: Daemon, honest: Honest) -> None:
    frames = st.one_of(
        FRAMES.map(lambda body: struct.pack(">I", len(body)) + body),
        st.binary(max_size=64),  # unframed junk, impossible lengths
    )

    @FUZZ
    @given(st.lists(frames, max_size=6), st.integers(0, 2))
    def case(stream: list[bytes], how: int) -> None:
        surface.case()
        sock = socket.create_connection(("127.0.0.1", sealed_daemon.tcp), timeout=5)
        with contextlib.suppress(OSError):
            sock.sendall(b"".join(stream))
        end(sock, how)

    honest.send()
    with Surface(sealed_daemon, "ingest_sealed_tcp") as surface:
        case()
        honest.send()
        honest.check_in_order()
