"""The hub's notices to joining subscribers (issue 18, review finding 6): an undeliverable
message tells a joining subscriber once, in order, not twice; resync notices kept for a join
are bounded by MAX_PENDING like the live events kept for it. Sans-IO."""

from __future__ import annotations

import msgspec
from test_hub import PRIVATE, PUBLIC, frames

from pushd.bus.model import Position
from pushd.gateway.hub import MAX_PENDING, Hub, Outlet

NOT_UTF8 = msgspec.Raw(b'"\xff"')


def test_an_undeliverable_message_tells_a_joining_subscriber_once() -> None:
    hub = Hub()
    joining = Outlet(1 << 20)
    hub.join(joining, PUBLIC)
    assert hub.publish(PUBLIC.internal, "e1", 1, msgspec.Raw(b"1")) == 0
    assert hub.publish(PUBLIC.internal, "e1", 2, NOT_UTF8) is None
    assert hub.publish(PUBLIC.internal, "e1", 3, msgspec.Raw(b"3")) == 0
    hub.settle(joining, PUBLIC, None)
    told = frames(bytes(joining.out))
    joining.out.clear()
    hub.drained(joining)
    told += frames(bytes(joining.out))
    assert [(m["seq"], "resync" in m) for m in told] == [(1, False), (2, True), (3, False)]
    assert hub.undeliverable == 1


def test_resync_notices_kept_for_a_join_are_bounded() -> None:
    """A join that never settles, with MAX_PENDING live events kept already: one notice more
    ends it like a slow reader instead of growing what is kept, on either resync path."""
    hub = Hub()
    public, private = Outlet(1 << 20), Outlet(1 << 20)
    hub.join(public, PUBLIC)
    hub.join(private, PRIVATE)
    for seq in range(1, MAX_PENDING + 1):
        hub.publish(PUBLIC.internal, "e1", seq, msgspec.Raw(b"1"))
        hub.publish(PRIVATE.internal, "e1", seq, msgspec.Raw(b"1"))
    assert not public.slow and not private.slow
    hub.resync(PUBLIC.internal, Position("e1", MAX_PENDING + 1))
    assert public.slow
    hub.resync_private()
    assert private.slow


def test_data_that_is_not_utf8_is_refused_on_a_route_only_views_and_taps_follow() -> None:
    """A channel only another dialect follows (a view, a tap) gets no pushd frame, but its
    data is checked all the same: publish answers None (``Delivery``: the bus keeps no such
    data as the channel's state, which a later native subscriber would be sent), and neither
    the views nor the taps are given it."""
    hub = Hub()
    told: list[object] = []
    hub.tap(PUBLIC, "tap", lambda epoch, seq, data: told.append(seq))
    hub.join_view(Outlet(1 << 20), PUBLIC, "view", lambda: lambda epoch, seq, data: b"x")
    assert hub.publish(PUBLIC.internal, "e1", 1, msgspec.Raw(b"1")) == 0
    assert hub.publish(PUBLIC.internal, "e1", 2, NOT_UTF8) is None
    assert told == [1] and hub.undeliverable == 1


def test_a_failing_tap_costs_its_event_only() -> None:
    """A tap is another dialect's code run inside ``Hub.publish`` (the Binance all-market
    arrays): one that raises costs that tap this event, counted as undeliverable; the
    channel's subscribers, and the other taps, still get it, and publish still answers."""
    hub = Hub()
    subscriber = Outlet(1 << 20)
    hub.subscribe(subscriber, PUBLIC)
    told: list[int] = []

    def broken(epoch: str, seq: int, data: msgspec.Raw) -> None:
        raise RuntimeError("a bug in a tap")

    hub.tap(PUBLIC, "broken", broken)
    hub.tap(PUBLIC, "fine", lambda epoch, seq, data: told.append(seq))
    assert hub.publish(PUBLIC.internal, "e1", 1, msgspec.Raw(b"1")) == 1
    assert told == [1] and hub.undeliverable == 1
    assert [m["seq"] for m in frames(bytes(subscriber.out))] == [1]
