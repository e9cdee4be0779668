"""The supervisor's watchdog rule, without processes: who is overdue, and when to look next."""

from __future__ import annotations

from pushd.liveness import Beats


def test_a_child_is_overdue_once_silent_for_the_timeout_and_reported_once() -> None:
    beats = Beats(5.0)
    assert beats.overdue(100.0) == [] and beats.next_check(100.0) == 105.0  # nobody watched
    beats.beat("gateway-1", 100.0)
    beats.beat("gateway-2", 101.0)
    assert beats.overdue(104.9) == []
    assert beats.next_check(104.9) == 105.0
    beats.beat("gateway-1", 104.0)  # a beat moves its deadline
    assert beats.overdue(106.0) == [("gateway-2", 5.0)]
    assert beats.overdue(106.0) == []  # reported once: it is being replaced
    assert beats.next_check(106.0) == 109.0


def test_a_replaced_child_is_watched_from_its_own_first_beat() -> None:
    beats = Beats(2.0)
    beats.beat("compute", 10.0)
    beats.forget("compute")  # it exited; its successor is still starting
    assert beats.overdue(30.0) == []
    beats.beat("compute", 30.0)
    assert beats.overdue(31.9) == [] and beats.overdue(32.0) == [("compute", 2.0)]


def test_a_stopping_child_may_fall_silent_for_the_stop_grace_only() -> None:
    beats = Beats(2.0, stop_grace_s=30.0)
    beats.beat("gateway-1", 0.0)
    beats.stopping("gateway-1", 1.0)  # it drains, then the interpreter ends: no more beats
    assert beats.overdue(10.0) == []
    assert beats.next_check(10.0) == 31.0
    beats.beat("gateway-1", 20.0)  # a beat while draining does not shorten the grace
    assert beats.overdue(30.9) == []
    assert beats.overdue(31.0) == [("gateway-1", 11.0)]  # hung in its shutdown
