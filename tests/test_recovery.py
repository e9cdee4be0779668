"""Recovery after a reconnect (``since``): the model, the Redis replies, the hub's
join/settle, and end to end on the memory bus (tests/test_cluster.py: on Redis)."""

from __future__ import annotations

from typing import Any

import msgspec
from conftest import make_config, open_client, start_daemon, subscribed
from test_bus_expiry import at_once
from upstream import Upstream
from wsframes import frames as server_frames

from pushd.bus.memory import MemoryBus
from pushd.bus.model import Entry, History, Outgoing, Position, Recovery
from pushd.bus.store import Recovered, decode_recovered, recovery_from
from pushd.channels import Channel
from pushd.errors import ErrorCode
from pushd.gateway.hub import Hub, Outlet

TRADES = Channel("trades_BTCUSDT", "BTCUSDT@trades", private=False, symbol="BTCUSDT")


def frames(buf: bytes) -> list[Any]:
    """The JSON of each frame in ``buf``."""
    return [msgspec.json.decode(payload) for _, payload in server_frames(buf)]


def raw(n: int) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({"n": n}))


def test_history_answers_exactly_or_not_at_all() -> None:
    history = History(size=3, max_age=10.0)
    for seq in range(1, 6):
        history.append(Entry(seq, raw(seq)), now=float(seq))
    assert [e.seq for e in history.since(2, 5, now=5.0) or ()] == [3, 4, 5]
    assert history.since(1, 5, now=5.0) is None  # 2 is gone: not a partial answer
    assert history.since(5, 5, now=5.0) == ()
    assert history.since(6, 5, now=5.0) is None  # ahead of the channel: a bad since
    assert history.since(3, 5, now=14.5) is None  # seq 4 is older than 10 s by then


def test_memory_bus_recovers_within_its_epoch_and_history() -> None:
    clock = [0.0]
    bus = MemoryBus(Hub(), history_size=4, history_age_s=60.0, clock=lambda: clock[0])
    bus.publish([Outgoing("trades_BTCUSDT", raw(n)) for n in range(1, 7)])
    here = bus.position("trades_BTCUSDT")
    assert here == Position(bus.epoch, 6)

    def recover(since: Position | None) -> Recovery:
        return recover_on(bus, "trades_BTCUSDT", since)

    ok = recover(Position(bus.epoch, 3))
    assert ok.recovered and [e.seq for e in ok.missed] == [4, 5, 6] and ok.position == here
    assert not recover(Position(bus.epoch, 1)).recovered  # history holds 3..6 only
    assert not recover(Position("another", 3)).recovered
    assert not recover(None).recovered
    # state streams keep no history: their current state replaces it
    bus.publish([Outgoing("ticker_BTCUSDT", raw(n)) for n in range(1, 3)])
    assert not recover_on(bus, "ticker_BTCUSDT", Position(bus.epoch, 1)).recovered
    assert recover_on(bus, "ticker_BTCUSDT", Position(bus.epoch, 2)).recovered


def recover_on(bus: MemoryBus, channel: str, since: Position | None) -> Recovery:
    """Run the memory bus's recover, which must answer without ever waiting."""
    return at_once(bus.recover(channel, since))


def test_settle_sends_the_replay_then_kept_events_none_twice() -> None:
    """Events published while a subscriber joins are kept; after the replay only the ones it
    does not have yet follow, in order."""
    hub = Hub()
    outlet = Outlet(100_000)
    hub.join(outlet, TRADES)
    for seq in (5, 6, 7):  # live while the bus was asked: 5 and 6 are also in the replay
        hub.publish(TRADES.internal, "e1", seq, raw(seq))
    assert outlet.out == b""  # nothing goes out before the replay
    missed = tuple(Entry(seq, raw(seq)) for seq in (4, 5, 6))
    start = hub.settle(outlet, TRADES, Recovery(Position("e1", 6), True, missed))
    assert start == Position("e1", 6)
    hub.publish(TRADES.internal, "e1", 8, raw(8))
    assert [f["seq"] for f in frames(bytes(outlet.out))] == [4, 5, 6, 7, 8]


def test_a_subscriber_that_leaves_while_joining_is_forgotten() -> None:
    upstream = Upstream()
    hub = Hub(upstream)
    left = upstream.left
    outlet = Outlet(100_000)
    hub.join(outlet, TRADES)
    hub.unsubscribe(outlet, TRADES.internal)
    assert left == [TRADES.internal]
    assert hub.settle(outlet, TRADES, Recovery(Position("e1", 0), False)) is None
    hub.publish(TRADES.internal, "e1", 1, raw(1))
    assert outlet.out == b""


async def test_reconnect_with_since_gets_exactly_the_missed_events(nursery: Any) -> None:
    running = await start_daemon(nursery, make_config())
    async with open_client(running.ws_url) as c:
        await c.call({"op": "auth", "token": running.token("1001")})
        reply = await c.call({"op": "subscribe", "channel": "@order", "id": 1})
        assert subscribed(reply, "@order") and "recovered" not in reply
        assert reply["streams"]["@order"] == {"epoch": running.epoch, "seq": 0}
        await running.publish("user_1001_order", {"n": 1})
        last = await c.recv()
    for n in (2, 3, 4):  # while the client is away
        await running.publish("user_1001_order", {"n": n})
    async with open_client(running.ws_url) as c:
        await c.call({"op": "auth", "token": running.token("1001")})
        since = {"seq": last["seq"], "epoch": last["epoch"]}
        reply = await c.call({"op": "subscribe", "channel": "@order", "since": since, "id": 2})
        assert reply["recovered"] is True
        assert reply["streams"]["@order"] == {"epoch": running.epoch, "seq": 4}
        replayed = [await c.recv() for _ in range(3)]
        assert [(e["seq"], e["data"]["n"]) for e in replayed] == [(2, 2), (3, 3), (4, 4)]
        await running.publish("user_1001_order", {"n": 5})
        assert (await c.recv())["seq"] == 5  # then live, nothing doubled
        # another user's history is never reachable: since applies to the session's own uid
        await c.call({"op": "auth", "token": running.token("1002")})
        reply = await c.call({"op": "subscribe", "channel": "@order", "since": since})
        assert reply["recovered"] is False
        assert reply["streams"]["@order"]["seq"] == 0


async def test_since_that_cannot_be_served_says_so(nursery: Any) -> None:
    running = await start_daemon(nursery, make_config(bus={"history_size": 2}))
    for n in range(1, 6):
        await running.publish("trades_BTCUSDT", {"n": n})
    async with open_client(running.ws_url) as c:
        old = {"seq": 1, "epoch": running.epoch}  # history keeps 4 and 5 only
        reply = await c.call({"op": "subscribe", "channel": "BTCUSDT@trades", "since": old})
        assert reply["recovered"] is False
        assert reply["streams"]["BTCUSDT@trades"]["seq"] == 5
        await c.call({"op": "unsubscribe", "channel": "BTCUSDT@trades"})
        stale = {"seq": 4, "epoch": "0badc0de"}  # a restarted daemon's client
        reply = await c.call({"op": "subscribe", "channel": "BTCUSDT@trades", "since": stale})
        assert reply["recovered"] is False
        await c.call({"op": "unsubscribe", "channel": "BTCUSDT@trades"})
        ahead = {"seq": 99, "epoch": running.epoch}
        reply = await c.call({"op": "subscribe", "channel": "BTCUSDT@trades", "since": ahead})
        assert reply["recovered"] is False
        two = await c.call(
            {"op": "subscribe", "channel": ["notice", "BTCUSDT@depth"], "since": old, "id": 9}
        )
        assert two["code"] == ErrorCode.INVALID_REQUEST and two["id"] == 9
        bad = await c.call({"op": "subscribe", "channel": "notice", "since": {"seq": -1}})
        assert bad["code"] == ErrorCode.INVALID_REQUEST
        assert (await c.call({"op": "ping"}))["op"] == "pong"  # and nothing else arrived


def test_a_replay_ahead_of_the_nodes_stream_gets_no_event_twice() -> None:
    """The bus may answer with events this node's own stream has not delivered yet (they are
    on their way over another connection): when they arrive, the subscriber skips them."""
    hub = Hub()
    early, outlet = Outlet(100_000), Outlet(100_000)
    hub.subscribe(early, TRADES)
    hub.publish(TRADES.internal, "e1", 4, raw(4))
    hub.join(outlet, TRADES)
    missed = tuple(Entry(seq, raw(seq)) for seq in (4, 5, 6))
    hub.settle(outlet, TRADES, Recovery(Position("e1", 6), True, missed))
    for seq in (5, 6, 7):  # 5 and 6 reach this node only now
        hub.publish(TRADES.internal, "e1", seq, raw(seq))
    assert [f["seq"] for f in frames(bytes(outlet.out))] == [4, 5, 6, 7]
    assert [f["seq"] for f in frames(bytes(early.out))] == [4, 5, 6, 7]
    assert hub.subscriber_count(TRADES.internal) == 2


def reply(epoch: str, seq: int, state_seq: int | None, entries: list[int]) -> Recovered:
    """A recover.lua reply as Redis sends it: entries newest first, fields as a flat list."""
    raw = [[f"{s}-0".encode(), [b"s", str(s).encode(), b"d", b'{"n":%d}' % s]] for s in entries]
    state = b'{"book":1}' if state_seq is not None else None
    return decode_recovered([epoch.encode(), seq, state_seq, state, list(reversed(raw))])


def test_a_redis_reply_recovers_only_when_it_holds_every_missed_event() -> None:
    ok = recovery_from(Position("e1", 5), reply("e1", 8, None, [6, 7, 8]))
    assert ok.recovered and [e.seq for e in ok.missed] == [6, 7, 8]
    assert ok.position == Position("e1", 8)
    assert not recovery_from(Position("e1", 4), reply("e1", 8, None, [6, 7, 8])).recovered
    assert not recovery_from(Position("e0", 5), reply("e1", 8, None, [6, 7, 8])).recovered
    assert not recovery_from(Position("e1", 9), reply("e1", 8, None, [])).recovered  # ahead
    assert recovery_from(Position("e1", 8), reply("e1", 8, None, [])).recovered  # nothing new
    holed = recovery_from(Position("e1", 5), reply("e1", 8, None, [6, 8]))
    assert not holed.recovered and holed.missed == ()


def test_a_redis_reply_gives_the_stored_state_and_the_diffs_after_it() -> None:
    start = recovery_from(None, reply("e1", 8, 6, [5, 6, 7, 8]))
    assert not start.recovered
    assert [e.seq for e in start.current] == [6, 7, 8]
    assert bytes(start.current[0].data) == b'{"book":1}'  # the state, at its seq
    # diffs after the state missing from history: no current, the hub falls back
    assert recovery_from(None, reply("e1", 8, 6, [8])).current == ()
