"""The embedded default bus: one process, delivery is a direct call into the hub.

The numbering of every channel lives here, in one epoch per process start: a client that
reconnects after a restart sees another epoch and reloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pushd.bus.model import Entry, History, Outgoing, Position, Recovery, new_epoch
from pushd.channels import StateKind, state_kind
from pushd.gateway.hub import Hub

SWEEP_EVERY = 4096  # publishes between sweeps of idle channels' histories


class MemoryBus:
    state_every = 0  # the hub asks Markets for current state: publishes carry none

    def __init__(
        self,
        hub: Hub,
        history_size: int,
        history_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self.epoch = new_epoch()
        self._seq: dict[str, int] = {}
        self._history: dict[str, History] = {}
        self._history_size = history_size
        self._history_age_s = history_age_s
        self._clock = clock
        self._until_sweep = SWEEP_EVERY

    def publish(self, items: Sequence[Outgoing]) -> None:
        self._publish(items)

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        return self._publish(items)

    def _publish(self, items: Sequence[Outgoing]) -> list[Position]:
        seqs, histories, epoch, now = self._seq, self._history, self.epoch, self._clock()
        publish = self._hub.publish
        positions = []
        for item in items:
            channel = item.channel
            seq = seqs.get(channel, 0) + 1
            seqs[channel] = seq
            history = histories.get(channel)
            if history is None:
                # a state stream's late subscriber gets its current state, not a replay
                size = self._history_size if state_kind(channel) is StateKind.EVENTS else 0
                history = histories[channel] = History(size, self._history_age_s)
            history.append(Entry(seq, item.data), now)
            publish(channel, epoch, seq, item.data)
            positions.append(Position(epoch, seq))
        self._until_sweep -= len(items)
        if self._until_sweep <= 0:
            self._sweep(now)
        return positions

    def _sweep(self, now: float) -> None:
        """Drop the histories of channels idle for longer than history is kept."""
        self._until_sweep = SWEEP_EVERY
        idle = [ch for ch, history in self._history.items() if history.idle(now)]
        for channel in idle:
            del self._history[channel]

    def position(self, channel: str) -> Position:
        return Position(self.epoch, self._seq.get(channel, 0))

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
