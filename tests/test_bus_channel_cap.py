"""The memory bus's channel table is bounded by ``bus.max_channels``, not only by age (review
of issue 18, finding 8): peers name channels (a uid each) faster than history expires, so past
the cap the longest-quiet channels nobody here follows are forgotten at once, with the same
numbering guarantee as an expiry (no ``(epoch, seq)`` given twice, a ``since`` across it is
``recovered: false``). Sans-IO, ``now`` passed in."""

from __future__ import annotations

import msgspec
from test_bus_expiry import at_once

from pushd.bus.memory import MemoryBus
from pushd.bus.model import Outgoing, Position
from pushd.channels import parse_internal
from pushd.config import BusConfig
from pushd.gateway.hub import Hub, Outlet

AGE_S = 300.0
CAP = 100


def test_past_max_channels_the_longest_quiet_unfollowed_channels_are_forgotten() -> None:
    now = [0.0]
    hub = Hub()
    bus = MemoryBus(hub, 200, AGE_S, clock=lambda: now[0], max_channels=CAP)
    hub.subscribe(Outlet(1 << 30), parse_internal("user_0_order", frozenset()))

    def publish(channel: str) -> Position:
        [at] = at_once(bus.publish_confirmed([Outgoing(channel, msgspec.Raw(b"{}"))]))
        return at

    publish("user_0_order")  # followed, and the quietest of all: kept
    for uid in range(1, CAP):
        now[0] += 1.0
        publish(f"user_{uid}_order")
        if uid == 4:  # a forgotten channel with seqs above 1: the floor must rise past them
            publish("user_4_order")
            publish("user_4_order")
    publish("user_1_order")  # user_1 spoke again: now user_2 is the longest quiet
    before = publish("user_2_order")
    before = publish("user_2_order")
    assert before == Position(bus.epoch, 3)
    now[0] += 1.0
    publish("user_3_order")
    assert bus.channels == CAP  # all within history_age_s: age alone forgets none

    now[0] += 1.0  # well inside history_age_s: only the cap forgets
    publish("user_new_order")
    assert bus.channels <= CAP
    assert bus.channels >= CAP - CAP // 10  # not more than down to nine tenths
    assert bus.position("user_0_order") == Position(bus.epoch, 1)  # followed: kept
    assert bus.position("user_1_order") == Position(bus.epoch, 2)  # spoke late: kept
    # user_4 (last heard at t=4) went; user_2 spoke after it: kept
    assert bus.position("user_2_order") == before
    assert bus.position("user_4_order") == Position(bus.epoch, 3) and bus.floor == 3
    # the numbering floor: a forgotten channel's since is not recovered, no seq is reused
    lost = at_once(bus.recover("user_4_order", Position(bus.epoch, 1)))
    assert not lost.recovered and lost.missed == ()
    assert publish("user_4_order") == Position(bus.epoch, 4)
    for uid in range(200, 200 + 10 * CAP):  # a flood of new names stays bounded
        now[0] += 0.001
        publish(f"user_{uid}_order")
        assert bus.channels <= CAP
    assert bus.position("user_0_order") == Position(bus.epoch, 1)


def test_max_channels_is_a_bus_setting_with_a_sane_default() -> None:
    assert BusConfig().max_channels == 100_000
    assert msgspec.convert({"max_channels": 5000}, BusConfig).max_channels == 5000
