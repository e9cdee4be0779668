"""The links to Redis, checked by pushd itself (issue 19, item 3).

A TCP connection whose peer went silent (a half-open link: a network that drops every packet,
a frozen Redis, a NAT that forgot the flow) looks open to both ends; coredis notices only after
its idle keepalive (15 s on a pub/sub connection, none on a command connection). So every
connection pushd holds to Redis has a probe of its own: a PING every
``bus.redis.probe_interval_s`` that must be answered within ``bus.redis.timeout_s`` (PING
works on a subscribed RESP3 connection too). A PING unanswered in time makes the link dead:
the node is not ready, saying which link and why, ``pushd_bus_up{link}`` is 0, and the
connection is replaced; the new pub/sub session checks every followed channel, so what was
published meanwhile is replayed or told. A dead link is noticed within
``probe_interval_s + timeout_s``.

``Link`` is the state of one role (commands, data, control): up, or down and why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio


class LinkDead(Exception):
    """A Redis connection did not answer a PING in time."""


class Link:
    """One role of this node's connections to Redis: up, or down and why (sans-IO)."""

    __slots__ = ("name", "reason", "up")

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = False
        self.reason = "not connected yet"

    def mark(self, up: bool, reason: str = "") -> bool:
        """Set the state; True if ``up`` changed."""
        changed = up != self.up
        self.up = up
        self.reason = "" if up else reason or "down"
        return changed


async def probe(pings: Iterable[Callable[[], Awaitable[Any]]], timeout_s: float) -> None:
    """PING every connection at once; raise ``LinkDead`` unless all answer within
    ``timeout_s``."""
    with trio.move_on_after(timeout_s) as deadline:
        async with trio.open_nursery() as nursery:
            for ping in pings:
                nursery.start_soon(ping)
    if deadline.cancelled_caught:
        raise LinkDead(f"no answer to PING within {timeout_s:g} s")


async def watch(
    pings: Callable[[], Iterable[Callable[[], Awaitable[Any]]]], interval_s: float, timeout_s: float
) -> None:
    """Probe the connections ``pings`` names every ``interval_s`` until one is dead (then
    raise ``LinkDead``); for the tasks of a session, which end with it."""
    while True:
        await probe(pings(), timeout_s)
        await trio.sleep(interval_s)
