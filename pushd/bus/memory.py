"""The embedded default bus: one process, delivery is a direct call into the hub.

The numbering of every channel lives here, in one epoch per process start: a client that
reconnects after a restart sees another epoch and reloads.

A channel's state (its seq and history) lasts as long as it is used: once the channel has no
subscriber on this node and its last message is older than history is kept, it is forgotten,
so channels named by peers (a uid per private channel) cost nothing after they go quiet. A
forgotten channel that comes back numbers its messages above every seq this process has
forgotten (``floor``): no ``(epoch, seq)`` is ever given to two messages, and a ``since``
from before the gap finds no history reaching back to it (``recovered: false``: reload), as
across a new epoch.

Channels are named by peers (a uid each), so age alone does not bound the table: past
``max_channels`` the channels nobody here follows that were quiet longest are forgotten at
once (the same way, ``floor`` included), down to nine tenths of it, so a flood of new names
costs a sort now and then, not one per name.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from pushd.bus.model import Delivery, Entry, History, Outgoing, Position, Recovery, new_epoch
from pushd.channels import StateKind, state_kind

SWEEP_EVERY = 4096  # publishes between sweeps of idle channels
SWEEPS_PER_AGE = 4  # timed sweeps per history_age_s: a quiet channel goes within 1.25 ages
TRIM_AFTER = 10_000  # channels forgotten in one sweep that are worth a malloc_trim
MAX_CHANNELS = 100_000  # channels kept by default (bus.max_channels)


class Subscribed(Delivery, Protocol):
    """What the memory bus delivers to (the hub): a ``Delivery`` that also says how many
    subscribers a channel has on this node, since only channels nobody here follows may be
    forgotten, and the hub is the one that knows (the Redis bus needs no such count: it
    follows a channel from the hub's first subscriber to its last)."""

    def subscriber_count(self, internal: str) -> int:
        """Subscribers of ``internal`` on this node, joining ones included."""


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_trim = _malloc_trim()


def give_back_memory() -> None:
    """Return the heap's free pages to the system: Python's allocator frees the forgotten
    channels' memory (their histories are malloc'd blocks) but glibc keeps it mapped, so
    without this RSS would stay at its peak for good."""
    if _trim is not None:
        _trim(0)


class MemoryBus:
    state_every = 0  # the hub asks Markets for current state: publishes carry none

    def __init__(
        self,
        hub: Subscribed,
        history_size: int,
        history_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_channels: int = MAX_CHANNELS,
    ) -> None:
        self._hub = hub
        self.epoch = new_epoch()
        self._seq: dict[str, int] = {}
        self._history: dict[str, History] = {}  # the same channels as _seq
        self._history_size = history_size
        self._history_age_s = history_age_s
        self._clock = clock
        self._until_sweep = SWEEP_EVERY
        self._max_channels = max_channels
        self._shed_above = max_channels  # raised while followed channels alone pass the cap
        self.shed = 0  # channels forgotten before their history expired (past max_channels)
        self.floor = 0  # the highest seq of any channel forgotten: new numberings start above

    def publish(self, items: Sequence[Outgoing]) -> int:
        return len(self._publish(items))

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        return self._publish(items)

    def _publish(self, items: Sequence[Outgoing]) -> list[Position]:
        seqs, histories, epoch, now = self._seq, self._history, self.epoch, self._clock()
        hub = self._hub
        positions = []
        for item in items:
            channel = item.channel
            seq = seqs.get(channel, self.floor) + 1
            seqs[channel] = seq
            history = histories.get(channel)
            if history is None:
                # a state stream's late subscriber gets its current state, not a replay
                size = self._history_size if state_kind(channel) is StateKind.EVENTS else 0
                history = histories[channel] = History(size, self._history_age_s)
            if hub.publish(channel, epoch, seq, item.data) is None:
                history.skip(now)  # never replayed: a since across it is not recovered
            else:
                history.append(Entry(seq, item.data), now)
            positions.append(Position(epoch, seq))
        self._until_sweep -= len(items)
        if self._until_sweep <= 0:
            self.sweep(now)
        if len(seqs) > self._shed_above:
            self._shed()
        return positions

    def _shed(self) -> None:
        """Past ``max_channels``: forget the channels nobody here follows that had their last
        message longest ago, down to nine tenths of the cap (followed channels are kept: they
        are bounded by the node's subscriptions)."""
        subscribers = self._hub.subscriber_count
        keep = self._max_channels - self._max_channels // 10
        idle = [(history.last, ch) for ch, history in self._history.items()
                if not subscribers(ch)]  # fmt: skip
        idle.sort()
        for _, channel in idle[: max(len(self._seq) - keep, 0)]:
            del self._history[channel]
            self.floor = max(self.floor, self._seq.pop(channel))
            self.shed += 1
        # followed channels alone past the cap: not one scan per new name (a sweep resets it)
        self._shed_above = max(self._max_channels, len(self._seq) + self._max_channels // 10)

    def sweep(self, now: float) -> int:
        """Forget the channels nobody here follows whose history has expired; returns how
        many channels are left."""
        self._until_sweep = SWEEP_EVERY
        self._shed_above = self._max_channels
        subscribers = self._hub.subscriber_count
        idle = [ch for ch, history in self._history.items()
                if history.idle(now) and not subscribers(ch)]  # fmt: skip
        for channel in idle:
            del self._history[channel]
            self.floor = max(self.floor, self._seq.pop(channel))
        if len(idle) >= TRIM_AFTER:  # a dict keeps its table at its peak size: copy them
            self._seq, self._history = dict(self._seq), dict(self._history)
        return len(self._seq)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep on a timer too, so channels are forgotten when publishing stops; after a
        sweep that forgot many, hand the freed memory back to the system."""
        task_status.started()
        while True:
            await trio.sleep(self._history_age_s / SWEEPS_PER_AGE)
            before = len(self._seq)
            if before - self.sweep(self._clock()) >= TRIM_AFTER:
                give_back_memory()

    @property
    def channels(self) -> int:
        """How many channels this bus keeps state for."""
        return len(self._seq)

    def position(self, channel: str) -> Position:
        return Position(self.epoch, self._seq.get(channel, self.floor))

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        position = self.position(channel)
        if since is None or since.epoch != self.epoch:
            return Recovery(position, recovered=False)
        history = self._history.get(channel)
        missed: tuple[Entry, ...] | None
        if history is None:
            missed = () if since.seq == position.seq else None
        else:
            missed = history.since(since.seq, position.seq, self._clock())
        if missed is None:
            return Recovery(position, recovered=False)
        return Recovery(position, recovered=True, missed=missed)

    def interest(self, channel: str) -> None:
        pass

    def disinterest(self, channel: str) -> None:
        pass

    def not_ready(self) -> str | None:
        return None
