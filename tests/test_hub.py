"""The fan-out core: encode once, bounded buffers, per-stream overflow policy. No sockets."""

from __future__ import annotations

import msgspec
from upstream import Upstream
from wsframes import frames as server_frames
from wsproto.frame_protocol import Opcode

from pushd.bus.model import Position, Snapshot
from pushd.channels import Channel
from pushd.gateway.hub import Hub, Outlet, frame_end, text_frame
from pushd.gateway.protocol import encode_event, encode_resync

PUBLIC = Channel("trades_BTCUSDT", "BTCUSDT@trades", private=False, symbol="BTCUSDT")
PRIVATE = Channel("user_1_order", "@order", private=True)
DATA = msgspec.Raw(b'{"p":"1.5"}')


def frames(buf: bytes) -> list[dict[str, object]]:
    """The JSON of each frame in ``buf`` (text frames only)."""
    parsed = server_frames(buf)
    assert all(opcode is Opcode.TEXT for opcode, _ in parsed)
    return [msgspec.json.decode(payload) for _, payload in parsed]


def test_text_frame_is_a_valid_server_frame() -> None:
    for size in (0, 125, 126, 65535, 65536):
        payload = b"x" * size
        assert server_frames(text_frame(payload)) == [(Opcode.TEXT, payload)]


def test_one_frame_shared_by_all_subscribers() -> None:
    hub = Hub()
    woken = []
    hub.on_dirty = lambda: woken.append(1)
    outlets = [Outlet(10_000) for _ in range(3)]
    for o in outlets:
        hub.subscribe(o, PUBLIC)
    assert hub.publish("trades_BTCUSDT", "e1", 1, DATA) == 3
    assert hub.publish("trades_BTCUSDT", "e1", 2, DATA) == 3
    assert woken == [1]  # one wake per tick, however many frames
    assert hub.dirty == outlets
    expected = text_frame(encode_event("BTCUSDT@trades", DATA, 1, "e1")) + text_frame(
        encode_event("BTCUSDT@trades", DATA, 2, "e1")
    )
    assert all(bytes(o.out) == expected for o in outlets)
    assert hub.publish("depth_BTCUSDT", "e1", 1, DATA) == 0
    assert hub.stats().delivered == 6


def test_unsubscribe_removes_route_and_calls_back() -> None:
    upstream = Upstream()
    hub = Hub(upstream)
    gone = upstream.left
    a, b = Outlet(100), Outlet(100)
    hub.subscribe(a, PUBLIC)
    hub.subscribe(b, PUBLIC)
    hub.unsubscribe(a, PUBLIC.internal)
    assert gone == [] and hub.subscriber_count(PUBLIC.internal) == 1
    hub.unsubscribe(b, PUBLIC.internal)
    assert gone == [PUBLIC.internal] and list(hub.channels()) == []


def test_public_overflow_drops_then_resyncs_once_drained() -> None:
    hub = Hub()
    frame_size = len(text_frame(encode_event("BTCUSDT@trades", DATA, 1, "e1")))
    slow, fast = Outlet(frame_size * 2), Outlet(10_000)
    hub.subscribe(slow, PUBLIC)
    hub.subscribe(fast, PUBLIC)
    for seq in range(1, 6):
        hub.publish(PUBLIC.internal, "e1", seq, DATA)
    assert [f["seq"] for f in frames(bytes(fast.out))] == [1, 2, 3, 4, 5]
    assert [f["seq"] for f in frames(bytes(slow.out))] == [1, 2]
    assert not slow.slow and slow.lagging == {PUBLIC.internal: (PUBLIC, Position("e1", 5))}
    slow.out.clear()  # the socket took it all
    hub.publish(PUBLIC.internal, "e1", 6, DATA)  # still lagging: dropped until drained() runs
    hub.drained(slow)
    hub.publish(PUBLIC.internal, "e1", 7, DATA)
    assert bytes(slow.out) == text_frame(encode_resync("BTCUSDT@trades", 6, "e1")) + text_frame(
        encode_event("BTCUSDT@trades", DATA, 7, "e1")
    )
    assert hub.stats().dropped == 4


def test_state_streams_start_and_resume_with_their_current_state() -> None:
    """A new subscriber gets the current state first; one that lagged gets it again instead of
    a resync notice, under the seq the stream stands at."""
    depth = Channel("depth_BTCUSDT", "BTCUSDT@depth", private=False, symbol="BTCUSDT")
    book = {"at": Position("e1", 0), "data": msgspec.Raw(b'{"e":"snapshot","u":0}')}
    hub = Hub(
        Upstream(
            lambda internal: (
                Snapshot(book["at"], book["data"])  # type: ignore[arg-type]
                if internal == depth.internal
                else None
            )
        )
    )
    frame_size = len(text_frame(encode_event("BTCUSDT@depth", DATA, 1, "e1")))
    slow = Outlet(frame_size * 3)
    hub.subscribe(slow, depth)
    assert frames(bytes(slow.out)) == [
        {"event": "BTCUSDT@depth", "data": {"e": "snapshot", "u": 0}, "seq": 0, "epoch": "e1"}
    ]
    for seq in range(1, 6):
        hub.publish(depth.internal, "e1", seq, DATA)
    assert [f["seq"] for f in frames(bytes(slow.out))] == [0, 1]  # then it overflowed
    slow.out.clear()
    book.update(at=Position("e1", 5), data=msgspec.Raw(b'{"e":"snapshot","u":5}'))
    hub.drained(slow)
    hub.publish(depth.internal, "e1", 6, DATA)
    assert frames(bytes(slow.out)) == [
        {
            "event": "BTCUSDT@depth",
            "data": {"e": "snapshot", "u": 5},
            "seq": 5,
            "epoch": "e1",
            "resync": True,
        },
        {"event": "BTCUSDT@depth", "data": {"p": "1.5"}, "seq": 6, "epoch": "e1"},
    ]  # the state after a lag is marked: the client replaces what it had
    trades = Outlet(10_000)
    hub.subscribe(trades, PUBLIC)
    assert trades.out == b""  # no state for trades: nothing is sent first


def test_private_overflow_marks_slow_and_never_skips() -> None:
    hub = Hub()
    frame_size = len(text_frame(encode_event("@order", DATA, 1, "e1")))
    outlet = Outlet(frame_size * 2)
    hub.subscribe(outlet, PRIVATE)
    for seq in range(1, 4):
        hub.publish(PRIVATE.internal, "e1", seq, DATA)
    assert outlet.slow
    assert [f["seq"] for f in frames(bytes(outlet.out))] == [1, 2]
    assert hub.dirty.count(outlet) >= 1


def test_reply_overflow_marks_slow() -> None:
    hub = Hub()
    outlet = Outlet(10)
    hub.send(outlet, b"12345")
    hub.send(outlet, b"123456")
    assert outlet.slow and bytes(outlet.out) == b"12345"


def test_frame_end_walks_headers_of_every_length() -> None:
    frames_ = [text_frame(b"x" * n) for n in (0, 5, 125, 126, 300, 65535, 65536, 70000)]
    buf = b"".join(frames_)
    ends = [sum(len(f) for f in frames_[: i + 1]) for i in range(len(frames_))]
    for upto in range(0, len(buf), 997):
        expected = next((e for e in [0, *ends] if e >= upto), len(buf))
        assert frame_end(buf, 0, upto) == expected
    assert frame_end(buf, ends[2], ends[2] + 1) == ends[3]


def test_private_gap_tells_every_private_subscriber() -> None:
    hub = Hub(
        Upstream(position=lambda internal: Position("e1", {"user_1_order": 7}.get(internal, 0)))
    )
    mine, public_only = Outlet(10_000), Outlet(10_000)
    hub.subscribe(mine, PRIVATE)
    hub.subscribe(mine, PUBLIC)
    hub.subscribe(public_only, PUBLIC)
    assert hub.resync_private() == 1
    assert frames(bytes(mine.out)) == [{"event": "@order", "resync": True, "seq": 7, "epoch": "e1"}]
    assert public_only.out == b""


def test_the_reply_to_a_subscribe_goes_before_the_streams_first_events() -> None:
    """Whatever settling queues (a current state, a replay), the reply comes first, and is
    told where each stream starts."""
    at = Position("e", 7)
    state = Snapshot(at, msgspec.Raw(b'{"b":1}'))
    hub = Hub(Upstream(lambda internal: state if internal == "depth_X" else None))
    outlet = Outlet(65536)
    hub.send(outlet, b"earlier")  # what was queued before stays before
    depth = Channel("depth_X", "X@depth", private=False, symbol="X")
    trades = Channel("trades_X", "X@trades", private=False, symbol="X")
    for channel in (depth, trades):
        hub.join(outlet, channel)
    told: list[Position | None] = []

    def reply(starts: list[Position | None]) -> bytes:
        told.extend(starts)
        return b'{"result":true}'

    hub.settle_with_reply(outlet, [(depth, None), (trades, None)], reply)
    assert told == [at, None]
    state = text_frame(encode_event("X@depth", msgspec.Raw(b'{"b":1}'), 7, "e"))
    assert bytes(outlet.out) == b"earlier" + text_frame(b'{"result":true}') + state


def test_a_reply_alone_is_queued_like_any_frame() -> None:
    hub = Hub()
    outlet = Outlet(65536)
    hub.settle_with_reply(outlet, [], lambda starts: b'{"result":true}')
    assert bytes(outlet.out) == text_frame(b'{"result":true}') and hub.take_dirty() == [outlet]
    assert hub.dirty == []


def test_a_close_frame_replaces_what_is_queued_but_a_frame_begun() -> None:
    hub = Hub()
    outlet = Outlet(64)
    hub.send(outlet, b"x" * 60)
    hub.send(outlet, b"y" * 10)  # does not fit: slow
    assert outlet.slow
    outlet.head_left = 5  # a partial send left 5 bytes of the first frame to write
    hub.take_dirty()
    hub.close_with(outlet, b"CLOSE")
    assert bytes(outlet.out) == b"xxxxxCLOSE" and not outlet.slow
    assert hub.take_dirty() == [outlet]


def test_a_private_gap_told_late_skips_channels_followed_only_since() -> None:
    """A gap retried until every node answered reaches some gateway seconds after it happened
    (its control link was down): a private channel this node began to follow after the gap
    missed nothing of it, and its subscriber must not be told to reload (the soak saw every
    user told at a cluster's start, for the 'took over the private events' gap)."""
    now = [100.0]
    hub = Hub(clock=lambda: now[0])
    early, late = Outlet(10_000), Outlet(10_000)
    hub.subscribe(early, PRIVATE)
    now[0] = 105.0
    hub.subscribe(late, Channel("user_2_balance", "@balance", private=True))
    assert hub.resync_private(gap_at=102.0) == 1  # the gap at 102 s: before the late channel began
    assert early.out and not late.out
    assert hub.resync_private() == 2  # a gap of unknown time tells everyone
