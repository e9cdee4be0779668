"""Every frame costs its sender: floods of any opcode end the flooder, never anyone else's service.

A connection's received frames (data, continuation, ping, pong, close, and reads that complete
none) draw on a token bucket (``limits.frames_per_second``, ``limits.frame_burst``); a message
takes at most ``limits.max_fragments_per_message`` frames and ``limits.message_timeout_s`` from
its first byte to its last; at most ``limits.max_pongs_owed`` pongs wait to be written. The
tests flood real sockets of a real daemon and check the close codes of docs/protocol.md, that a
well-behaved client is served meanwhile, and that legitimate fragmentation (with pings between
the fragments, as RFC 6455 allows) still works. The last test throws random frame sequences
(hypothesis) at a ``pushd run`` process: each ends served or closed with a documented code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import struct
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from conftest import (
    RawClient,
    Running,
    make_config,
    open_client,
    start_daemon,
    subscribed,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scrape import Scrape
from test_fuzz import spawn_daemon
from wsframes import ServerFrames, client_frame, close_code, ws_connect
from wsproto.events import AcceptConnection, CloseConnection, Pong, TextMessage

from pushd.config import LimitsConfig
from pushd.errors import CloseCode
from pushd.gateway.ratelimit import Breach, FrameBudget

LIMITS = LimitsConfig()
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


frame = client_frame  # a client frame as a broken or hostile client may write it


async def raw_open(port: int) -> RawClient:
    raw = await RawClient.connect(port)
    assert isinstance(await raw.handshake(), AcceptConnection)
    return raw


async def read_events(raw: RawClient, done: Callable[[list[Any]], bool]) -> list[Any]:
    """The server's frames as wsproto events (JSON messages decoded) until ``done`` says so;
    fails on a close frame or EOF before that."""
    events: list[Any] = []
    with trio.fail_after(10):
        while True:
            for event in raw.ws.events():  # first what came with the handshake's answer, if any
                assert not isinstance(event, CloseConnection), (event, events[-5:])
                if isinstance(event, TextMessage):
                    assert event.message_finished  # the server never fragments
                    events.append(msgspec.json.decode(event.data))
                else:
                    events.append(event)
            if done(events):
                return events
            data = await raw.stream.receive_some(1 << 20)
            assert data, f"EOF after {events[-5:]}"
            raw.ws.receive_data(data)


def pongs(events: list[Any]) -> list[bytes]:
    return [bytes(e.payload) for e in events if isinstance(e, Pong)]


def replied(request_id: str) -> Callable[[list[Any]], bool]:
    return lambda events: any(isinstance(e, dict) and e.get("id") == request_id for e in events)


# -- the budget itself (sans-IO: the clock is an argument) -------------------------------------


def budget(**limits: Any) -> FrameBudget:
    return FrameBudget(msgspec.structs.replace(LIMITS, **limits), now=0.0)


def test_budget_charges_every_frame_and_refills_with_time() -> None:
    b = budget(frames_per_second=2.0, frame_burst=3)
    assert [b.frame(0.0), b.frame(0.0), b.frame(0.0)] == [None, None, None]
    assert b.frame(0.0) is Breach.FRAME_RATE
    assert b.data(0.4, frame_finished=True, message_finished=True) is Breach.FRAME_RATE
    assert b.data(0.5, frame_finished=True, message_finished=True) is None  # 1 s/2 refilled


def test_budget_counts_fragments_per_message_not_pieces() -> None:
    b = budget(max_fragments_per_message=3, frame_burst=100)
    for _ in range(5):  # pieces of one frame are not fragments
        assert b.data(0.0, frame_finished=False, message_finished=False) is None
    assert b.data(0.0, frame_finished=True, message_finished=False) is None
    assert b.data(0.0, frame_finished=True, message_finished=False) is None
    assert b.data(0.0, frame_finished=True, message_finished=True) is None  # 3 frames: fine
    assert b.data(0.0, frame_finished=True, message_finished=False) is None
    assert b.data(0.0, frame_finished=True, message_finished=False) is None
    assert b.data(0.0, frame_finished=True, message_finished=False) is Breach.FRAGMENTS


def test_budget_deadline_runs_from_a_messages_first_byte() -> None:
    b = budget(message_timeout_s=10.0)
    assert b.deadline == math.inf
    assert b.data(1.0, frame_finished=False, message_finished=False) is None
    assert b.deadline == 11.0
    assert b.data(10.9, frame_finished=True, message_finished=True) is None
    assert b.deadline == math.inf  # finished: no deadline until the next message begins
    assert b.data(20.0, frame_finished=True, message_finished=False) is None
    assert b.overdue(29.9) is None and b.overdue(30.0) is Breach.MESSAGE_TIMEOUT
    b.abandon()
    assert b.deadline == math.inf and b.overdue(1e9) is None


def test_budget_retune_applies_at_once() -> None:
    b = budget()
    b.retune(msgspec.structs.replace(LIMITS, frame_burst=1, frames_per_second=0.001))
    assert b.frame(0.0) is None and b.frame(0.0) is Breach.FRAME_RATE


# -- floods, with a well-behaved client connected meanwhile -----------------------------------


async def flood(
    port: int, first: bytes, unit: bytes, codes: trio.MemorySendChannel[int | None]
) -> None:
    """One flooder: connect, send ``first`` then ``unit`` again and again until the server's
    close frame comes; report its code; connect again, as an attacker would. Runs until
    cancelled."""

    async def send_forever(raw: RawClient) -> None:
        batch = unit * 1000
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await raw.send_raw(first)
            while True:
                await raw.send_raw(batch)

    while True:
        raw = await raw_open(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_forever, raw)
            _, code = await raw.read_until_close()
            nursery.cancel_scope.cancel()
        await codes.send(code)
        await raw.aclose()


async def served_during_flood(running: Running, first: bytes, unit: bytes) -> list[int | None]:
    """Two flooders run while a subscriber of ``notice`` gets each event published and a reply
    to each application ping; returns the close codes the flood connections got."""
    send, receive = trio.open_memory_channel[int | None](1000)
    codes: list[int | None] = []
    async with open_client(running.ws_url) as victim:
        assert subscribed(await victim.call({"op": "subscribe", "channel": "notice"}), "notice")
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(flood, running.ports.websocket, first, unit, send)
            with trio.fail_after(20):
                codes += [await receive.receive(), await receive.receive()]  # the flood is cut
                for n in range(5):  # ... and, while it goes on, the subscriber is served
                    await running.publish("notice", {"n": n})
                    event = await victim.recv()
                    assert event["event"] == "notice" and event["data"] == {"n": n}, event
                    pong = await victim.call({"op": "ping", "id": n})
                    assert pong["op"] == "pong" and pong["id"] == n, pong
                codes += [await receive.receive(), await receive.receive()]  # still cut
            nursery.cancel_scope.cancel()
    return codes


async def test_zero_length_continuation_flood_is_cut(running: Running) -> None:
    """Issue 18 item 4: a started message, then empty continuation frames without end."""
    codes = await served_during_flood(
        running, frame(TEXT, b'{"op":', fin=False), frame(CONTINUATION, fin=False)
    )
    assert set(codes) == {CloseCode.MESSAGE_TOO_BIG}, codes


async def test_ping_flood_is_cut(running: Running) -> None:
    """Issue 18 item 5: WebSocket pings as fast as the socket takes them."""
    codes = await served_during_flood(running, b"", frame(PING, b"ping"))
    assert set(codes) == {CloseCode.RATE_LIMITED}, codes


# -- the bounds, frame by frame ---------------------------------------------------------------


async def test_fragments_past_the_cap_close_with_1009(running: Running) -> None:
    """The close comes after exactly one fragment too many, without waiting for more."""
    raw = await raw_open(running.ports.websocket)
    fragments = [frame(TEXT, b'{"op":"ping"', fin=False)]
    fragments += [frame(CONTINUATION, fin=False)] * LIMITS.max_fragments_per_message
    await raw.send_raw(b"".join(fragments))
    _, code = await raw.read_until_close()
    assert code == CloseCode.MESSAGE_TOO_BIG
    await raw.aclose()


async def test_frames_past_the_budget_close_with_4001(nursery: trio.Nursery) -> None:
    """Pongs and pings count like any frame: the burst is served, one frame more closes."""
    burst = 20
    config = make_config(limits={"frames_per_second": 0.01, "frame_burst": burst})
    running = await start_daemon(nursery, config)
    raw = await raw_open(running.ports.websocket)
    await raw.send_raw(frame(PONG, b"unasked") * (burst - 1) + frame(PING, b"last"))
    assert pongs(await read_events(raw, lambda events: bool(pongs(events)))) == [b"last"]
    await raw.send_raw(frame(PING, b"one too many"))
    _, code = await raw.read_until_close()
    assert code == CloseCode.RATE_LIMITED
    await raw.aclose()


async def test_a_frame_in_tiny_segments_pays_per_segment(nursery: trio.Nursery) -> None:
    """A read that completes no frame costs one token: a ping that comes in one segment is
    answered, the same ping one byte per TCP segment (each read by the server before the
    next is sent) breaks a budget of five."""
    config = make_config(limits={"frames_per_second": 0.01, "frame_burst": 5})
    running = await start_daemon(nursery, config)
    ping = frame(PING)
    assert len(ping) == 6
    whole = await raw_open(running.ports.websocket)
    await whole.send_raw(ping)
    assert pongs(await read_events(whole, lambda events: bool(pongs(events)))) == [b""]
    dribbled = await raw_open(running.ports.websocket)
    for byte in ping:
        await dribbled.send_raw(bytes([byte]))
        await trio.testing.wait_all_tasks_blocked()  # the server has read it and waits again
    _, code = await dribbled.read_until_close()
    assert code == CloseCode.RATE_LIMITED
    await whole.aclose()
    await dribbled.aclose()


async def test_fragmented_message_with_pings_between_is_served(running: Running) -> None:
    """RFC 6455: control frames may come between a message's fragments. The most fragments
    allowed, some of them empty, with an unasked pong after each and a ping after each of the
    first ones (as many as may be owed a pong at once): every ping is answered, in order, and
    the message is one request."""
    text = b'{"op":"ping","id":"fragmented"}'
    cap = LIMITS.max_fragments_per_message
    pieces = [text[i : i + 1] for i in range(cap // 2)]
    pieces += [b""] * (cap - len(pieces) - 1) + [text[cap // 2 :]]
    assert len(pieces) == cap and b"".join(pieces) == text
    data = b""
    for i, piece in enumerate(pieces):
        data += frame(TEXT if i == 0 else CONTINUATION, piece, fin=i == cap - 1)
        if i < cap - 1:
            data += frame(PONG, b"unasked")
        if i < LIMITS.max_pongs_owed:
            data += frame(PING, b"%d" % i)
    raw = await raw_open(running.ports.websocket)
    await raw.send_raw(data)
    events = await read_events(raw, replied("fragmented"))
    assert pongs(events) == [b"%d" % i for i in range(LIMITS.max_pongs_owed)]
    assert events[-1]["op"] == "pong"
    await raw.aclose()


async def test_close_inside_a_fragmented_message_is_answered(running: Running) -> None:
    """A close frame between a message's fragments (legal: it is a control frame) is answered
    with the same code; the frames after it are not read (a flood there costs nothing)."""
    raw = await raw_open(running.ports.websocket)
    await raw.send_raw(
        frame(TEXT, b'{"op":', fin=False)
        + frame(PING, b"inside")
        + frame(CLOSE, struct.pack(">H", 1000) + b"bye")
        + frame(CONTINUATION, fin=False) * 5000
    )
    _, code = await raw.read_until_close()
    assert code == 1000
    await raw.aclose()


async def test_unfinished_message_is_closed_after_message_timeout(nursery: trio.Nursery) -> None:
    """The message timer outlived: a message begun and never finished ends its connection with
    1008 once ``message_timeout_s`` has passed, with no further frame from the client. A
    message that finishes in time is served."""
    running = await start_daemon(nursery, make_config(limits={"message_timeout_s": 0.5}))
    raw = await raw_open(running.ports.websocket)
    await raw.send_raw(frame(TEXT, b'{"op":"ping",', fin=False))
    await raw.send_raw(frame(CONTINUATION, b'"id":"in time"}'))
    await read_events(raw, replied("in time"))
    started = trio.current_time()
    await raw.send_raw(frame(TEXT, b'{"op":"ping"', fin=False))
    _, code = await raw.read_until_close()
    assert code == CloseCode.POLICY_VIOLATION
    assert trio.current_time() - started >= 0.5
    await raw.aclose()


async def test_pongs_owed_are_capped(running: Running) -> None:
    """A client that pings faster than its pongs can be written is not owed a pong for each:
    at most ``max_pongs_owed`` wait, and the latest ping is answered once they are out
    (RFC 6455 5.5.3 allows answering only the latest)."""
    pings = 190  # with the fence, under the default burst
    raw = await raw_open(running.ports.websocket)
    payloads = [b"%04d" % i for i in range(pings)]
    await raw.send_raw(
        b"".join(frame(PING, p) for p in payloads) + frame(TEXT, b'{"op":"ping","id":"fence"}')
    )
    events = await read_events(raw, lambda events: replied("fence")(events)
                               and pongs(events)[-1:] == [payloads[-1]])  # fmt: skip
    answered = pongs(events)
    assert len(answered) < pings // 2, len(answered)
    assert answered == sorted(answered) and answered[-1] == payloads[-1]
    await raw.aclose()


async def test_frame_limits_change_live_on_reload(nursery: trio.Nursery) -> None:
    """A reload's frame budget applies to connections already open."""
    running = await start_daemon(nursery, make_config())
    raw = await raw_open(running.ports.websocket)
    await raw.send_raw(frame(PING, b"before"))
    assert pongs(await read_events(raw, lambda events: bool(pongs(events)))) == [b"before"]
    tighter = make_config(limits={"frames_per_second": 0.01, "frame_burst": 3})
    running.daemon.load_config = lambda: tighter
    change = await running.daemon.reload()
    assert change is not None and "limits.frame_burst" in change.applied
    await raw.send_raw(frame(PING, b"1") + frame(PING, b"2") + frame(PING, b"3") + frame(PING))
    _, code = await raw.read_until_close()
    assert code == CloseCode.RATE_LIMITED
    await raw.aclose()


# -- random frame sequences against a pushd process --------------------------------------------

EXAMPLES = int(os.environ.get("PUSHD_FUZZ_EXAMPLES", "300"))
FENCE = b"fence"
CLOSE_SECTION = re.compile(r"## Close codes.*?\n\n(.*?)\n\n", re.S)


def documented_close_codes() -> set[int]:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    match = CLOSE_SECTION.search(doc)
    assert match is not None
    return {int(code) for code in re.findall(r"^\| (\d{4}) \|", match[1], re.M)}


@pytest.fixture(scope="module")
def daemon_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    """A ``pushd run`` process (default frame limits, a 1 s message timeout): its WebSocket
    and HTTP ports and its log file."""
    tmp = tmp_path_factory.mktemp("frames")
    for running in spawn_daemon(tmp, (
        "[websocket]\nport = 0\nmax_connections_per_ip = 100000\n"
        "handshakes_per_second = 1e9\n[http]\nport = 0\n[auth.hmac]\nsecret = 's'\n"
        "[engine]\nsnapshot_enabled = false\n"
        "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
        "udp_port = 0\ntcp_port = 0\n"
        "[limits]\nmessage_timeout_s = 1.0\n[log]\nformat = 'json'\n"
    )):  # fmt: skip
        yield running.ws, running.http, running.log
        assert running.proc.poll() is None, running.log.read_text()[-4000:]


def outcome(sock: socket.socket) -> tuple[str, int | None]:
    """Read the server's frames until our fence ping's pong ("served") or a close frame
    ("closed", its code or None if it carried none); "eof" / "silent" if neither came."""
    server = ServerFrames()
    while True:
        for opcode, payload in server.pending:
            if opcode == PONG and payload == FENCE:
                return "served", None
            if opcode == CLOSE:
                return "closed", close_code(payload)
        server.pending.clear()
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return "silent", None
        except OSError:
            return "eof", None
        if not chunk:
            return "eof", None
        server.feed(chunk)


PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b'{"op":"ping"}', b'{"op":', b'"ping"}', b"\xff\xfe", b"\xc3",
                     b"\x03\xe8bye", b"\x0f\xa0", b"\x03\xed", b"\x00", b"x" * 125, b"x" * 126,
                     b"x" * 5000]),
)  # fmt: skip
# (opcode, payload, fin, rsv, mask, repeat): mostly frames a client may send, in any order
# (that is where the odd states are), one in ten anything at all
SANE_FRAMES = st.builds(
    lambda op, payload, fin, repeat: (op, payload, fin or op >= CLOSE, 0, True, repeat),
    st.sampled_from([CONTINUATION, CONTINUATION, TEXT, BINARY, CLOSE, PING, PING, PONG]),
    st.one_of(PAYLOADS, st.sampled_from([b"", b"\x03\xe8", b"\x0f\xa0bye", b'{"op":"ping"}'])),
    st.booleans(), st.integers(1, 300),
)  # fmt: skip
WILD_FRAMES = st.tuples(
    st.integers(0, 15), PAYLOADS, st.booleans(), st.integers(0, 7), st.booleans(),
    st.integers(1, 300),
)  # fmt: skip
FRAME_SPECS = st.integers(0, 9).flatmap(lambda k: WILD_FRAMES if k == 0 else SANE_FRAMES)
SEQUENCES = st.lists(FRAME_SPECS, max_size=12)


def test_random_frame_sequences_are_served_or_closed(daemon_port: tuple[int, int, Path]) -> None:
    """Random opcodes, FIN bits, RSV bits, masks and lengths, in any order (continuations
    without a start, data inside a fragmented message, control frames inside one, frames after
    a close, floods of one frame), sent in random TCP segments: each connection is either
    still served (it answers a ping sent after the frames) or closed with a code that
    docs/protocol.md documents, or the one the client's own close frame carried."""
    ws, http, log = daemon_port
    documented = documented_close_codes()
    outcomes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(SEQUENCES, st.integers(1, 16))
    def case(specs: list[tuple[int, bytes, bool, int, bool, int]], segments: int) -> None:
        data = b""
        echoed: set[int | None] = set()  # codes of the client's own close frames
        for opcode, payload, fin, rsv, mask, repeat in specs:
            repeat = repeat if opcode in (CONTINUATION, PING, PONG) and not payload else 1
            data += frame(opcode, payload, fin=fin, rsv=rsv, mask=mask) * repeat
            if opcode == CLOSE:
                echoed.add(close_code(payload))
        data += frame(PING, FENCE)
        sock = ws_connect(ws)
        try:
            step = max(1, len(data) // segments)
            with contextlib.suppress(OSError):
                for i in range(0, len(data), step):
                    sock.sendall(data[i : i + step])
            sock.settimeout(5)
            how, code = outcome(sock)
        finally:
            sock.close()
        assert how in ("served", "closed"), (how, specs)
        if how == "closed":
            assert code in documented or code in echoed, (code, specs)
        outcomes[how if how == "served" else f"{how} {code}"] += 1

    case()
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics") as answer:
        metrics = Scrape(answer.read().decode())
    internal = [
        (name, value)
        for name in metrics.labels
        for _, value in metrics.samples(name, reason="internal_error")
        if value
    ]
    assert not internal, internal
    text = log.read_text()
    assert "connection failed" not in text and "flush failed" not in text, text[-4000:]
    cases = sum(outcomes.values())
    print(f"frame sequences: {cases} cases: {dict(outcomes.most_common())}")
    report = os.environ.get("PUSHD_FUZZ_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"surface": "frame sequences", "cases": cases}) + "\n")
