"""A hub's upstream for sans-IO tests (``bus.model.Upstream``): states and positions from the
functions given, and a record of what the hub asked of it."""

from __future__ import annotations

from collections.abc import Callable

from pushd.bus.model import Position, Snapshot


class Upstream:
    def __init__(
        self,
        current: Callable[[str], Snapshot | None] = lambda _channel: None,
        position: Callable[[str], Position | None] = lambda _channel: None,
    ) -> None:
        self._current = current
        self._position = position
        self.followed: list[str] = []  # interest, in order
        self.left: list[str] = []  # disinterest, in order
        self.wanted: list[str] = []  # want_state, in order

    def interest(self, channel: str) -> None:
        self.followed.append(channel)

    def disinterest(self, channel: str) -> None:
        self.left.append(channel)

    def want_state(self, channel: str) -> None:
        self.wanted.append(channel)

    def position(self, channel: str) -> Position | None:
        return self._position(channel)

    def current(self, channel: str) -> Snapshot | None:
        return self._current(channel)
