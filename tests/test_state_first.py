"""The first event after a subscribe to a depth stream is the whole book (issue 19): a join
whose recovery brought no state waits, its live diffs kept, until a state arrives; the diffs
before it are never sent. The hub directly (memory bus, one process) and real gateways on
Redis, where a channel's new epoch began with diffs (Redis came back empty while the compute's
outbox still held them)."""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from conftest import open_client, start_daemon, subscribed
from redis_servers import Redis
from test_bus_expiry import at_once
from test_cluster import redis_config
from test_recovery import frames
from upstream import Upstream

from pushd.bus.memory import MemoryBus
from pushd.bus.model import Entry, Outgoing, Position, Recovery, Snapshot
from pushd.channels import Channel
from pushd.gateway.hub import Hub, Outlet

DEPTH = Channel("depth_BTCUSDT", "BTCUSDT@depth", private=False, symbol="BTCUSDT")


def depth_event(kind: str, u: int) -> msgspec.Raw:
    level = [[f"{100 + u}.0", "1"]]
    event = {"e": kind, "s": "BTCUSDT", "U": u, "u": u, "pu": u - 1, "bids": level, "asks": []}
    return msgspec.Raw(msgspec.json.encode(event))


def diff(u: int) -> msgspec.Raw:
    return depth_event("depthUpdate", u)


def book(u: int) -> msgspec.Raw:
    return depth_event("snapshot", u)


def sent(outlet: Outlet) -> list[tuple[str, int]]:
    return [(f["data"]["e"], f["seq"]) for f in frames(bytes(outlet.out))]


def test_a_depth_join_without_state_waits_for_one_and_gets_no_diff_before_it() -> None:
    upstream = Upstream()
    hub = Hub(upstream)
    wanted = upstream.wanted
    outlet = Outlet(100_000)
    hub.join(outlet, DEPTH)
    hub.publish(DEPTH.internal, "e1", 2, diff(2))  # kept while the bus is asked
    start = hub.settle(outlet, DEPTH, Recovery(Position("e1", 2), recovered=False))
    assert start == Position("e1", 2)
    assert wanted == [DEPTH.internal] and hub.wants_state(DEPTH.internal)
    hub.publish(DEPTH.internal, "e1", 3, diff(3))
    assert outlet.out == b""  # no diff before a state
    hub.publish(DEPTH.internal, "e1", 4, diff(4))  # the bus read the state after it
    current = (Entry(3, book(3)), Entry(4, diff(4)))
    assert hub.offer_state(DEPTH.internal, Recovery(Position("e1", 4), False, current=current)) == 1
    hub.publish(DEPTH.internal, "e1", 5, diff(5))
    assert sent(outlet) == [("snapshot", 3), ("depthUpdate", 4), ("depthUpdate", 5)]
    assert not hub.wants_state(DEPTH.internal)


def test_a_whole_state_stream_or_events_never_wait() -> None:
    hub = Hub()
    outlet = Outlet(100_000)
    trades = Channel("trades_BTCUSDT", "BTCUSDT@trades", private=False, symbol="BTCUSDT")
    ticker = Channel("ticker_BTCUSDT", "BTCUSDT@ticker", private=False, symbol="BTCUSDT")
    for channel in (trades, ticker):  # each ticker event is the whole state
        hub.join(outlet, channel)
        hub.settle(outlet, channel, Recovery(Position("e1", 0), recovered=False))
        hub.publish(channel.internal, "e1", 1, msgspec.Raw(b'{"e":"x"}'))
        assert not hub.wants_state(channel.internal)
    assert [f["event"] for f in frames(bytes(outlet.out))] == [
        "BTCUSDT@trades", "BTCUSDT@ticker"
    ]  # fmt: skip


def test_on_the_memory_bus_the_first_depth_event_is_the_book_once_there_is_one() -> None:
    """One process: before the first book nothing; the book's own event is not sent twice."""
    state: dict[str, Snapshot] = {}
    hub = Hub(Upstream(state.get))
    bus = MemoryBus(hub, 100, 60.0)
    outlet = Outlet(100_000)
    bus.publish([Outgoing(DEPTH.internal, diff(1))])  # a diff published with no book
    hub.join(outlet, DEPTH)
    hub.settle(outlet, DEPTH, at_once(bus.recover(DEPTH.internal, None)))
    bus.publish([Outgoing(DEPTH.internal, diff(2))])
    assert outlet.out == b""
    state[DEPTH.internal] = Snapshot(Position(bus.epoch, 3), book(3))  # the book, as Markets has it
    bus.publish([Outgoing(DEPTH.internal, book(3))])
    bus.publish([Outgoing(DEPTH.internal, diff(4))])
    assert sent(outlet) == [("snapshot", 3), ("depthUpdate", 4)]


async def recv_event(client: Any) -> dict[str, Any]:
    while "event" not in (message := await client.recv()):
        pass
    return message  # type: ignore[no-any-return]


async def test_a_gateway_joining_a_new_epoch_that_began_with_diffs_starts_from_the_book(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """As the compute's outbox does after Redis came back empty: diffs with no stored state
    open the channel's new epoch; a subscriber's first event is the first stored book."""
    gateway = await start_daemon(nursery, redis_config(redis, "gateway"))
    bus = gateway.daemon.redis
    assert bus is not None
    with trio.fail_after(10):  # "pushd ready" is the listeners; the links come up after
        await bus.wait_ready()
    await bus.publish_confirmed([Outgoing(DEPTH.internal, diff(1))])
    async with open_client(gateway.ws_url) as client:
        reply = await client.call({"op": "subscribe", "channel": DEPTH.protocol})
        assert subscribed(reply, DEPTH.protocol), reply
        await bus.publish_confirmed([Outgoing(DEPTH.internal, diff(2))])
        await bus.publish_confirmed([Outgoing(DEPTH.internal, diff(3), state=book(3))])
        await bus.publish_confirmed([Outgoing(DEPTH.internal, diff(4))])
        first, second = await recv_event(client), await recv_event(client)
        assert (first["data"]["e"], first["seq"]) == ("snapshot", 3), first
        assert (second["data"]["e"], second["seq"]) == ("depthUpdate", 4), second
        # a later subscriber on the same node starts from the stored book too
        async with open_client(gateway.ws_url) as late:
            assert subscribed(await late.call({"op": "subscribe", "channel": DEPTH.protocol}),
                              DEPTH.protocol)  # fmt: skip
            got = await recv_event(late)
            assert (got["data"]["e"], got["seq"]) == ("snapshot", 3), got
