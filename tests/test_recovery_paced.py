"""A replay larger than the outbound buffer (issue 18, item 11): it is paced into the buffer as
it drains, and the live events of its channel follow it in order -- never a 4002 that the
client answers by reconnecting and asking for the same replay again.

The hub's part is tested without sockets (the test plays the flusher: it takes the buffer and
says it drained); end to end, a client recovers a replay ten times its buffer from a daemon
while events are published as fast as the publish API takes them."""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from conftest import RawClient, make_config, start_daemon
from test_recovery import TRADES, frames, raw

from pushd.bus.model import Entry, Position, Recovery
from pushd.channels import Channel
from pushd.gateway.hub import MAX_PENDING, Hub, Outlet, text_frame

ORDER = Channel("user_1001_order", "@order", private=True, symbol=None)
PAYLOAD = "x" * 200  # each event about 300 bytes on the wire


def big(n: int) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({"n": n, "pad": PAYLOAD}))


def drain(hub: Hub, outlet: Outlet) -> list[Any]:
    """What the flusher does: write the whole buffer, then tell the hub it drained."""
    written = frames(bytes(outlet.out))
    outlet.out.clear()
    hub.dirty.clear()
    if outlet.behind:
        hub.drained(outlet)
    return written


def test_a_replay_larger_than_the_buffer_is_paced_with_live_events_in_order() -> None:
    for channel in (TRADES, ORDER):
        hub = Hub()
        outlet = Outlet(4096)
        hub.join(outlet, channel)
        for seq in (298, 299, 300, 301):  # live while the bus was asked; 298-300 replayed too
            hub.publish(channel.internal, "e1", seq, big(seq))
        missed = tuple(Entry(seq, big(seq)) for seq in range(11, 301))  # ~90 KB: 22 buffers
        hub.settle(outlet, channel, Recovery(Position("e1", 300), True, missed))
        assert not outlet.slow
        assert len(outlet.out) <= outlet.limit // 2  # room left for replies meanwhile
        hub.send(outlet, text_frame(b'{"op":"pong","ts":1}' + b" " * 1900))
        assert not outlet.slow
        seqs: list[int] = []
        published = 301
        while outlet.behind:
            seqs += [f["seq"] for f in drain(hub, outlet) if "seq" in f]
            published += 1  # the live stream goes on meanwhile
            hub.publish(channel.internal, "e1", published, big(published))
            assert not outlet.slow and len(outlet.out) <= outlet.limit
        seqs += [f["seq"] for f in drain(hub, outlet)]
        assert seqs == list(range(11, published + 1)), channel  # no gap, double or reorder
        assert not outlet.behind
        hub.publish(channel.internal, "e1", published + 1, big(published + 1))
        assert [f["seq"] for f in drain(hub, outlet)] == [published + 1]  # live now


def test_a_replay_ahead_of_the_nodes_stream_is_paced_too() -> None:
    hub = Hub()
    outlet = Outlet(4096)
    hub.subscribe(Outlet(1 << 20), TRADES)
    hub.publish(TRADES.internal, "e1", 10, big(10))
    hub.join(outlet, TRADES)
    missed = tuple(Entry(seq, big(seq)) for seq in range(11, 101))  # 91-100 not here yet
    hub.settle(outlet, TRADES, Recovery(Position("e1", 100), True, missed))
    seqs: list[int] = []
    for seq in range(11, 103):  # this node's own stream catches up as the replay is paced
        hub.publish(TRADES.internal, "e1", seq, big(seq))
        seqs += [f["seq"] for f in drain(hub, outlet)]
    while outlet.out:
        seqs += [f["seq"] for f in drain(hub, outlet)]
    assert seqs == list(range(11, 103))


def test_a_subscriber_that_leaves_during_a_paced_replay_is_forgotten() -> None:
    hub = Hub()
    outlet = Outlet(4096)
    hub.join(outlet, TRADES)
    missed = tuple(Entry(seq, big(seq)) for seq in range(1, 101))
    hub.settle(outlet, TRADES, Recovery(Position("e1", 100), True, missed))
    assert outlet.behind
    hub.unsubscribe(outlet, TRADES.internal)
    assert not outlet.behind and hub.subscriber_count(TRADES.internal) == 0
    drain(hub, outlet)
    hub.publish(TRADES.internal, "e1", 101, big(101))
    assert outlet.out == b""


def test_a_public_replay_that_falls_too_far_behind_resyncs_and_a_private_one_is_slow() -> None:
    """A reader so slow that the live stream runs MAX_PENDING events ahead of its replay: a
    public stream goes on as a lagging one (a resync notice), a private one closes (4002)."""
    for channel in (TRADES, ORDER):
        hub = Hub()
        outlet = Outlet(4096)
        hub.join(outlet, channel)
        missed = tuple(Entry(seq, raw(seq)) for seq in range(1, 1001))
        hub.settle(outlet, channel, Recovery(Position("e1", 1000), True, missed))
        last = 1000 + MAX_PENDING + 1
        for seq in range(1001, last + 1):  # the reader reads nothing meanwhile
            hub.publish(channel.internal, "e1", seq, raw(seq))
        assert outlet.slow is channel.private
        if not channel.private:
            seqs = []
            while outlet.out:
                seqs += drain(hub, outlet)
            assert seqs[-1] == {"event": "BTCUSDT@trades", "resync": True, "seq": last,
                                "epoch": "e1"}  # fmt: skip
            hub.publish(channel.internal, "e1", last + 1, raw(last + 1))
            assert [f["seq"] for f in drain(hub, outlet)] == [last + 1]


def test_a_bus_resync_during_a_paced_replay_comes_after_the_kept_events() -> None:
    hub = Hub()
    outlet = Outlet(4096)
    hub.join(outlet, TRADES)
    missed = tuple(Entry(seq, big(seq)) for seq in range(1, 51))
    hub.settle(outlet, TRADES, Recovery(Position("e1", 50), True, missed))
    hub.publish(TRADES.internal, "e1", 51, big(51))
    assert hub.resync(TRADES.internal, Position("e1", 53)) == 1  # 52 and 53 never came
    hub.publish(TRADES.internal, "e1", 54, big(54))
    seen: list[Any] = []
    while outlet.out:
        seen += drain(hub, outlet)
    assert [(f["seq"], f.get("resync", False)) for f in seen[-3:]] == [
        (51, False), (53, True), (54, False)
    ]  # fmt: skip
    assert [f["seq"] for f in seen[:-3]] == list(range(1, 51))


def test_an_event_larger_than_the_whole_buffer_cannot_be_paced() -> None:
    hub = Hub()
    outlet = Outlet(4096)
    fits = Recovery(Position("e1", 2), True, (Entry(1, big(1)), Entry(2, big(2))))
    huge = msgspec.Raw(msgspec.json.encode({"pad": "x" * 5000}))
    too_big = Recovery(Position("e1", 2), True, (Entry(1, big(1)), Entry(2, huge)))
    assert hub.unpaceable(outlet, TRADES, fits) is None
    assert hub.unpaceable(outlet, TRADES, too_big) == "size"


async def test_a_client_recovers_a_replay_ten_times_its_buffer_while_events_pour_in(
    nursery: trio.Nursery,
) -> None:
    """Failed before the fix: the replay went into the buffer in one go and the client got
    4002 instead of its reply (and again on every retry)."""
    config = make_config(
        limits={"outbound_buffer_bytes": 65536, "socket_send_buffer_bytes": 4096},
        bus={"history_size": 2000},
    )
    running = await start_daemon(nursery, config)
    data = {"pad": "y" * 450}
    for _ in range(2):
        await running.publish_batch([{"channel": "notice", "data": data}] * 1000)
    # ~1 MB of replay: 16 buffers
    client = await RawClient.connect(running.ports.websocket, rcvbuf=4096)
    assert (await client.handshake()).__class__.__name__ == "AcceptConnection"
    since = {"seq": 0, "epoch": running.epoch}
    await client.send_json({"op": "subscribe", "channel": "notice", "since": since, "id": 1})
    # requests while the replay is paced are answered, not a 4002: the replay leaves room
    await client.send_json({"op": "subscribe", "channel": "BTCUSDT@trades", "id": 2})
    await client.send_json({"op": "ping", "id": 3})
    done = trio.Event()
    published: list[int] = []

    async def pour() -> None:  # the live stream while the replay is paced
        while not done.is_set():
            published.extend(await running.publish_batch([{"channel": "notice", "data": data}]))

    messages: list[Any] = []
    last = 0  # the last notice seq received

    async def read() -> None:
        nonlocal last
        batch, code = await client.read_one_batch()
        assert code is None, f"closed with {code}"
        messages.extend(batch)
        last = max([m["seq"] for m in batch if m.get("event") == "notice"], default=last)

    with trio.fail_after(60):
        async with trio.open_nursery() as pouring:
            pouring.start_soon(pour)
            while len(published) <= 50:
                await read()
            done.set()
        while last < published[-1]:  # the pour has ended: every seq it published comes
            await read()
    reply, events = messages[0], [m for m in messages[1:] if m.get("event") == "notice"]
    assert reply["id"] == 1 and reply["recovered"] is True, reply
    assert {m.get("id") for m in messages} >= {1, 2, 3}
    assert reply["streams"]["notice"]["seq"] >= 2000
    assert [e["seq"] for e in events] == list(range(1, published[-1] + 1))
    await client.send_json({"op": "unsubscribe", "channel": "notice"})
    restarted = {"seq": 5, "epoch": "0badc0de"}
    await client.send_json({"op": "subscribe", "channel": "notice", "since": restarted, "id": 4})
    with trio.fail_after(10):
        while True:
            batch, _ = await client.read_one_batch()
            if answer := [m for m in batch if m.get("id") == 4]:
                break
    assert answer[0]["recovered"] is False and answer[0]["reason"] == "epoch"
    await client.aclose()
