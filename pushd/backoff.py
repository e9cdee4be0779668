"""Exponential backoff, the one rule for every reconnect and restart (sans-IO).

Used by the Redis bus (pub/sub sessions, catch-up reads), the book poller (the engine's
snapshot server) and the supervisor (children that exit): the first wait is ``first``, each
failure doubles it up to ``most``, and a success starts it again from ``first``.
"""

from __future__ import annotations


class Backoff:
    __slots__ = ("delay", "first", "most")

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self.delay = first  # the next wait

    def next(self) -> float:
        """The wait after a failure; the one after the next failure doubles (up to ``most``)."""
        delay = self.delay
        self.delay = min(delay * 2, self.most)
        return delay

    def reset(self) -> None:
        """A success: the next failure waits ``first`` again."""
        self.delay = self.first
