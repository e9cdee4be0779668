"""The sans-IO machine a node follows channels with (pushd/bus/follow.py), tested directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushd.bus.follow import TABLE, Action, Event, Following, State
from pushd.errors import FollowError

S, E, A = State, Event, Action

# Every row, written out again: a changed row is a decision, not an accident
EXPECTED = [
    (S.NOT_FOLLOWING, E.WANT, S.WAITING, ()),
    (S.WAITING, E.LINK_UP, S.SUBSCRIBING, (A.SUBSCRIBE,)),
    (S.WAITING, E.DROP, S.NOT_FOLLOWING, ()),
    (S.SUBSCRIBING, E.SUBSCRIBED, S.FOLLOWING, (A.READY,)),
    (S.SUBSCRIBING, E.DROP, S.SUBSCRIBING_UNWANTED, ()),
    (S.SUBSCRIBING, E.LINK_DOWN, S.WAITING, ()),
    (S.SUBSCRIBING_UNWANTED, E.SUBSCRIBED, S.UNSUBSCRIBING, (A.UNSUBSCRIBE,)),
    (S.SUBSCRIBING_UNWANTED, E.WANT, S.SUBSCRIBING, ()),
    (S.SUBSCRIBING_UNWANTED, E.LINK_DOWN, S.NOT_FOLLOWING, ()),
    (S.FOLLOWING, E.DROP, S.UNSUBSCRIBING, (A.UNSUBSCRIBE,)),
    (S.FOLLOWING, E.LINK_DOWN, S.WAITING, (A.UNREADY,)),
    (S.UNSUBSCRIBING, E.UNSUBSCRIBED, S.NOT_FOLLOWING, ()),
    (S.UNSUBSCRIBING, E.WANT, S.UNSUBSCRIBING_WANTED, ()),
    (S.UNSUBSCRIBING, E.LINK_DOWN, S.NOT_FOLLOWING, ()),
    (S.UNSUBSCRIBING_WANTED, E.UNSUBSCRIBED, S.SUBSCRIBING, (A.SUBSCRIBE,)),
    (S.UNSUBSCRIBING_WANTED, E.DROP, S.UNSUBSCRIBING, ()),
    (S.UNSUBSCRIBING_WANTED, E.LINK_DOWN, S.WAITING, ()),
]


def test_the_table_is_the_one_written_down() -> None:
    assert {(s, e): (n, a) for s, e, n, a in EXPECTED} == TABLE


def put(machine: Following, channel: str, state: State, *, link: bool = True) -> None:
    machine._states[channel] = state  # a machine in a given state, to test one row
    machine.link_up = link


@pytest.mark.parametrize(("state", "event", "new", "actions"), EXPECTED)
def test_each_row(state: State, event: Event, new: State, actions: tuple[Action, ...]) -> None:
    machine = Following()
    # a WANT row is the one step with the link down (with it up, LINK_UP follows at once)
    link = event not in (E.LINK_UP, E.WANT)
    if state is not S.NOT_FOLLOWING:
        put(machine, "notice", state, link=link)
    if event is E.LINK_UP:
        got = machine.up().get("notice", [])
    elif event is E.LINK_DOWN:
        got = machine.down().get("notice", [])
    else:
        got = {
            E.WANT: machine.want, E.DROP: machine.drop, E.SUBSCRIBED: machine.subscribed,
            E.UNSUBSCRIBED: machine.unsubscribed,
        }[event]("notice")  # fmt: skip
    assert (machine.state("notice"), tuple(got)) == (new, actions)


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in State for e in (E.WANT, E.DROP, E.SUBSCRIBED, E.UNSUBSCRIBED)
     if (s, e) not in TABLE],
)  # fmt: skip
def test_an_event_with_no_row_raises_naming_the_channel_and_state(
    state: State, event: Event
) -> None:
    machine = Following()
    if state is not S.NOT_FOLLOWING:
        put(machine, "BTCUSDT@depth", state)
    send = {E.WANT: machine.want, E.DROP: machine.drop, E.SUBSCRIBED: machine.subscribed,
            E.UNSUBSCRIBED: machine.unsubscribed}[event]  # fmt: skip
    with pytest.raises(FollowError, match=rf"'BTCUSDT@depth' is {state.value}"):
        send("BTCUSDT@depth")
    assert machine.state("BTCUSDT@depth") is state  # nothing changed


def test_want_with_the_link_up_subscribes_at_once() -> None:
    machine = Following()
    assert machine.up() == {}
    assert machine.want("notice") == [A.SUBSCRIBE]
    assert machine.state("notice") is S.SUBSCRIBING


def test_resubscribe_during_an_unsubscribe_waits_for_it() -> None:
    """Issue 19, item 1: the last client leaves and one comes back before Redis confirmed."""
    machine = Following()
    machine.up()
    machine.want("notice")
    assert machine.subscribed("notice") == [A.READY]
    assert machine.drop("notice") == [A.UNSUBSCRIBE]
    assert machine.want("notice") == []  # no second command while one is outstanding
    assert machine.unsubscribed("notice") == [A.SUBSCRIBE]
    assert machine.subscribed("notice") == [A.READY]
    assert machine.following() == {"notice"} and machine.settled()


class Model:
    """A Redis pub/sub connection as the machine drives it: commands in order, confirmed in
    order, each confirmation what Redis answers (the tests decide when, never how)."""

    def __init__(self) -> None:
        self.machine = Following()
        self.carried: set[str] = set()  # what Redis has subscribed on the current link
        self.in_flight: list[tuple[Action, str]] = []  # sent, not confirmed yet
        self.hub: set[str] = set()  # what the hub wants (its own bookkeeping)

    def act(self, channel: str, actions: list[Action]) -> None:
        for action in actions:
            if action in (A.SUBSCRIBE, A.UNSUBSCRIBE):
                assert self.machine.link_up, f"{action} with no link"
                assert all(c != channel for _, c in self.in_flight), "two commands outstanding"
                self.in_flight.append((action, channel))

    def step(self, op: str, channel: str) -> None:
        m = self.machine
        if op == "want" and channel not in self.hub:
            self.hub.add(channel)
            self.act(channel, m.want(channel))
        elif op == "drop" and channel in self.hub:
            self.hub.discard(channel)
            self.act(channel, m.drop(channel))
        elif op == "ack" and self.in_flight:
            action, acked = self.in_flight.pop(0)
            if action is A.SUBSCRIBE:
                self.carried.add(acked)
                self.act(acked, m.subscribed(acked))
            else:
                self.carried.discard(acked)
                self.act(acked, m.unsubscribed(acked))
        elif op == "fail" and m.link_up:  # the link lost (or a command not confirmed)
            self.carried.clear()
            self.in_flight.clear()
            m.down()
        elif op == "up" and not m.link_up:
            for c, actions in m.up().items():
                self.act(c, actions)
        assert m.wanted() == self.hub  # the machine's idea of the hub's wishes is the hub's
        assert m.following() <= self.carried  # what the hub is fed is subscribed in Redis

    def settle(self) -> None:
        while self.in_flight:
            self.step("ack", "")
        if self.machine.link_up:
            assert self.machine.settled()
            assert self.carried == self.hub == self.machine.following()
        else:
            assert self.carried == set()


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["want", "drop", "ack", "fail", "up"]),
                  st.sampled_from(["notice", "BTCUSDT@depth", "ETHUSDT@trades"])),
        max_size=60,
    )
)  # fmt: skip
def test_once_all_acks_are_in_redis_carries_what_the_hub_wants(
    steps: list[tuple[str, str]],
) -> None:
    model = Model()
    for op, channel in steps:
        model.step(op, channel)
    model.settle()
    model.step("up", "")
    model.settle()  # and on a link: exactly the wanted channels, all followed
    assert model.machine.following() == model.hub
