"""Which channels a node follows in Redis, one explicit state per channel (sans-IO).

The hub says what it *wants* (a channel's first subscriber came, its last one left); Redis
says what it *did* (a SUBSCRIBE or UNSUBSCRIBE confirmed, the pub/sub link lost or back).
Between the two, each channel is in exactly one state of ``TABLE``, and the only way a state
changes is a row of it: ``(state, event) -> (state, actions)``. An event with no row is a bug
and raises, naming the channel and its state (as h11's ``_state.py`` does for HTTP).

At most one SUBSCRIBE or UNSUBSCRIBE per channel is ever outstanding: a subscribe that
arrives during an unsubscribe waits for its confirmation and then subscribes again, and an
unsubscribe during a subscribe waits likewise. So once every confirmation is in, what Redis
was asked to carry is exactly what the hub wants, and the node never holds a channel that
Redis delivers while the hub ignores it (issue 19, item 1).

A lost link (or a command Redis did not confirm in time: its outcome is unknown, so the
connection is discarded with it) leaves no channel subscribed; the channels still wanted
wait for the next link, which subscribes them all.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from pushd.errors import FollowError


class State(enum.Enum):
    NOT_FOLLOWING = "not following"  # Redis not asked; the hub does not want it (no entry)
    WAITING = "waiting for the link"  # wanted, but no pub/sub link to ask on
    SUBSCRIBING = "subscribing"  # SUBSCRIBE sent, not confirmed; wanted
    SUBSCRIBING_UNWANTED = "subscribing, then unsubscribing"  # the hub left meanwhile
    FOLLOWING = "following"  # confirmed; Redis delivers it and the hub gets it
    UNSUBSCRIBING = "unsubscribing"  # UNSUBSCRIBE sent, not confirmed; not wanted
    UNSUBSCRIBING_WANTED = "unsubscribing, then subscribing"  # the hub came back meanwhile


class Event(enum.Enum):
    WANT = "the hub's first subscriber"
    DROP = "the hub's last subscriber left"
    SUBSCRIBED = "Redis confirmed SUBSCRIBE"
    UNSUBSCRIBED = "Redis confirmed UNSUBSCRIBE"
    LINK_UP = "a new pub/sub link"
    LINK_DOWN = "the pub/sub link lost"


class Action(enum.Enum):
    SUBSCRIBE = "subscribe"  # send SUBSCRIBE (SSUBSCRIBE on a Cluster)
    UNSUBSCRIBE = "unsubscribe"
    READY = "ready"  # Redis delivers it now: a joining client's recovery may read
    UNREADY = "unready"  # Redis no longer delivers it (the link went)


S, E, A = State, Event, Action
TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.NOT_FOLLOWING, E.WANT): (S.WAITING, ()),  # then LINK_UP at once if the link is up
    (S.WAITING, E.LINK_UP): (S.SUBSCRIBING, (A.SUBSCRIBE,)),
    (S.WAITING, E.DROP): (S.NOT_FOLLOWING, ()),
    (S.SUBSCRIBING, E.SUBSCRIBED): (S.FOLLOWING, (A.READY,)),
    (S.SUBSCRIBING, E.DROP): (S.SUBSCRIBING_UNWANTED, ()),
    (S.SUBSCRIBING, E.LINK_DOWN): (S.WAITING, ()),
    (S.SUBSCRIBING_UNWANTED, E.SUBSCRIBED): (S.UNSUBSCRIBING, (A.UNSUBSCRIBE,)),
    (S.SUBSCRIBING_UNWANTED, E.WANT): (S.SUBSCRIBING, ()),
    (S.SUBSCRIBING_UNWANTED, E.LINK_DOWN): (S.NOT_FOLLOWING, ()),
    (S.FOLLOWING, E.DROP): (S.UNSUBSCRIBING, (A.UNSUBSCRIBE,)),
    (S.FOLLOWING, E.LINK_DOWN): (S.WAITING, (A.UNREADY,)),
    (S.UNSUBSCRIBING, E.UNSUBSCRIBED): (S.NOT_FOLLOWING, ()),
    (S.UNSUBSCRIBING, E.WANT): (S.UNSUBSCRIBING_WANTED, ()),
    (S.UNSUBSCRIBING, E.LINK_DOWN): (S.NOT_FOLLOWING, ()),
    (S.UNSUBSCRIBING_WANTED, E.UNSUBSCRIBED): (S.SUBSCRIBING, (A.SUBSCRIBE,)),
    (S.UNSUBSCRIBING_WANTED, E.DROP): (S.UNSUBSCRIBING, ()),
    (S.UNSUBSCRIBING_WANTED, E.LINK_DOWN): (S.WAITING, ()),
}

# What Redis carries on the link in each state, once the outstanding command is confirmed
# (the invariant: with nothing outstanding, carried == wanted)
WANTED = {S.WAITING, S.SUBSCRIBING, S.FOLLOWING, S.UNSUBSCRIBING_WANTED}
OUTSTANDING = {S.SUBSCRIBING, S.SUBSCRIBING_UNWANTED, S.UNSUBSCRIBING, S.UNSUBSCRIBING_WANTED}


class Following:
    """Every channel's state and the link's; each method returns what to do, in order."""

    def __init__(self) -> None:
        self._states: dict[str, State] = {}
        self.link_up = False

    def state(self, channel: str) -> State:
        return self._states.get(channel, S.NOT_FOLLOWING)

    def __iter__(self) -> Iterator[tuple[str, State]]:
        return iter(list(self._states.items()))

    def wanted(self) -> set[str]:
        return {c for c, s in self._states.items() if s in WANTED}

    def following(self) -> set[str]:
        """The channels Redis delivers to this node and the hub gets."""
        return {c for c, s in self._states.items() if s is S.FOLLOWING}

    def settled(self) -> bool:
        """No command outstanding: what Redis carries is what the hub wants."""
        return all(s not in OUTSTANDING for s in self._states.values())

    def want(self, channel: str) -> list[Action]:
        actions = self._on(channel, E.WANT)
        if self.link_up and self.state(channel) is S.WAITING:
            actions += self._on(channel, E.LINK_UP)
        return actions

    def drop(self, channel: str) -> list[Action]:
        return self._on(channel, E.DROP)

    def subscribed(self, channel: str) -> list[Action]:
        return self._on(channel, E.SUBSCRIBED)

    def unsubscribed(self, channel: str) -> list[Action]:
        return self._on(channel, E.UNSUBSCRIBED)

    def up(self) -> dict[str, list[Action]]:
        """A new link, with nothing subscribed on it: subscribe everything wanted."""
        if self.link_up:
            raise FollowError("the pub/sub link came up twice")
        self.link_up = True
        return {c: self._on(c, E.LINK_UP) for c, s in self if s is S.WAITING}

    def down(self) -> dict[str, list[Action]]:
        """The link is gone, and every subscription on it."""
        if not self.link_up:
            return {}
        self.link_up = False
        return {c: self._on(c, E.LINK_DOWN) for c, s in self if s is not S.WAITING}

    def _on(self, channel: str, event: Event) -> list[Action]:
        state = self.state(channel)
        row = TABLE.get((state, event))
        if row is None:
            raise FollowError(
                f"channel {channel!r} is {state.value}: {event.value} is not expected"
            )
        new, actions = row
        if new is S.NOT_FOLLOWING:
            self._states.pop(channel, None)
        else:
            self._states[channel] = new
        return list(actions)
