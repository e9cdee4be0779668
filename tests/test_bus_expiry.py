"""The memory bus forgets a channel once nobody here follows it and its history has expired
(issue 18, item 10): channels named by peers (a uid each) cost nothing after they go quiet,
and a ``since`` across the gap is never answered with another life's messages."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
import trio
import trio.testing

from pushd.bus.memory import MemoryBus
from pushd.bus.model import Outgoing, Position, Recovery
from pushd.channels import parse_internal
from pushd.gateway.hub import Hub, Outlet

T = TypeVar("T")
UIDS = 50_000
AGE_S = 60.0


def at_once(coro: Coroutine[Any, Any, T]) -> T:
    """Run one of the memory bus's coroutines, which must answer without ever waiting."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    raise AssertionError("the memory bus waited")


def recover(bus: MemoryBus, channel: str, since: Position) -> Recovery:
    return at_once(bus.recover(channel, since))


def publish(bus: MemoryBus, channel: str) -> Position:
    [at] = at_once(bus.publish_confirmed([Outgoing(channel, msgspec.Raw(b"{}"))]))
    return at


def test_quiet_channels_are_forgotten_and_the_table_shrinks_back() -> None:
    now = [0.0]
    hub = Hub()
    bus = MemoryBus(hub, history_size=200, history_age_s=AGE_S, clock=lambda: now[0])
    followed = parse_internal("user_7_order", frozenset())
    hub.subscribe(Outlet(1 << 30), followed)
    data = msgspec.Raw(b'{"status":"new"}')
    bus.publish([Outgoing(f"user_{uid}_order", data) for uid in range(1, UIDS + 1)])
    bus.publish([Outgoing("user_9_order", data), Outgoing("user_9_order", data)])
    assert bus.channels == UIDS
    old = bus.position("user_9_order")
    assert old == Position(bus.epoch, 3)

    now[0] = AGE_S - 1
    assert bus.sweep(now[0]) == UIDS  # history still reaches back: nothing forgotten
    assert recover(bus, "user_9_order", Position(bus.epoch, 1)).recovered

    now[0] = AGE_S + 1
    assert bus.sweep(now[0]) == 1  # only the channel someone follows is left
    assert bus.position("user_7_order") == Position(bus.epoch, 1)

    # the forgotten channel comes back numbered above every forgotten seq, never reusing one
    assert bus.position("user_9_order") == Position(bus.epoch, 3)
    lost = recover(bus, "user_9_order", Position(bus.epoch, 1))  # 2 and 3 expired unseen
    assert not lost.recovered and lost.missed == ()
    assert publish(bus, "user_9_order") == Position(bus.epoch, 4)
    assert not recover(bus, "user_9_order", Position(bus.epoch, 1)).recovered
    exact = recover(bus, "user_9_order", Position(bus.epoch, 3))  # it had all of the old life
    assert exact.recovered and [e.seq for e in exact.missed] == [4]
    assert publish(bus, "user_10_order") == Position(bus.epoch, 4)  # 1 was given: never again


async def test_the_bus_forgets_on_a_timer_when_publishing_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No publish comes to trigger a sweep after a burst of spoofed uids: the timer does."""
    bus = MemoryBus(Hub(), history_size=200, history_age_s=AGE_S, clock=trio.current_time)
    bus.publish([Outgoing(f"user_{uid}_order", msgspec.Raw(b"1")) for uid in range(100)])
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await trio.sleep(AGE_S / 2)
        assert bus.channels == 100
        await trio.sleep(AGE_S)
        assert bus.channels == 0
        nursery.cancel_scope.cancel()
