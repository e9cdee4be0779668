"""Who publishes what when two compute nodes get the same engine feed: a Redis lease per
symbol (and one for the private events), so each is published once.

Both nodes ingest, poll and compute everything (the standby stays warm); only the holder of a
symbol's lease publishes its streams. The holder renews every ``ttl / 3``; a node that cannot
renew (Redis unreachable, or the loop stalled) gives its leases up locally once ``ttl`` has
passed since its last renewal, which is when Redis lets another node take them. So two nodes
never publish a symbol at once for longer than clock drift, and a dead leader is replaced
within ``ttl`` + ``ttl / 3``.

Taking a lease (a new one, or one Redis lost: an empty restart) is a hand-over even when this
node held it before: ``on_gain`` runs (the node publishes what it computed and nobody published,
and every state stream's state), and until it has returned the name is not yet led, so that
what the node computes meanwhile waits for that hand-over instead of overtaking it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
import trio

from pushd.bus.link import REDIS_ERRORS, describe
from pushd.bus.redis import RedisBus
from pushd.bus.store import lua_script

log = structlog.get_logger("pushd.bus.lease")

PRIVATE = "private"  # the lease of the private events (orders, balances, positions)


RENEWED, TAKEN = 1, 2  # lease.lua's answers when this node holds the lease


def held_by_us(reply: Any) -> bool:
    """The one place a ``lease.lua`` reply is read: exactly 1 (renewed) or 2 (taken now) is
    "this node holds it"; any other answer is not a lease held."""
    return type(reply) is int and reply in (RENEWED, TAKEN)


class Leases:
    def __init__(
        self,
        bus: RedisBus,
        node_id: str,
        names: Iterable[str],
        ttl_s: float,
        on_gain: Callable[[str, bool], Awaitable[None]],
        on_lose: Callable[[str], None] = lambda _name: None,
    ) -> None:
        self._bus = bus
        self._node_id = node_id
        self._names = list(names)
        self._ttl_s = ttl_s
        self._on_gain = on_gain
        self._on_lose = on_lose
        self.held: set[str] = set()
        self._taking: set[str] = set()  # held, hand-over (on_gain) not done yet
        self.lapsed: set[str] = set()  # held until Redis stopped answering: given up, not lost
        self._renewed_at = 0.0
        self._script: Any = None  # registered once the bus has its client
        self.gained = 0
        self.lost = 0

    def leads(self, name: str) -> bool:
        return name in self.held and name not in self._taking

    def keeps(self, name: str) -> bool:
        """What this node computes for ``name`` now is kept, not published: it led ``name``
        until it could not renew (Redis unreachable), or it is taking ``name`` over. Kept for
        when it takes the lease (``on_gain`` says ``resumed`` if it had it, as it also does
        when Redis lost a lease this node held), dropped if another node has it (``on_lose``)."""
        return name in self.lapsed or name in self._taking

    def _key(self, name: str) -> str:
        return f"{self._bus.prefix}:{{lease:{name}}}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take what is free before reporting started; then renew and take over forever."""
        self._script = self._bus.client.register_script(lua_script("lease.lua"))
        await self._round()
        task_status.started()
        while True:
            await trio.sleep(self._ttl_s / 3)
            await self._round()

    async def _round(self) -> None:
        ttl_ms = str(int(self._ttl_s * 1000))
        try:
            with trio.fail_after(self._ttl_s / 3):
                async with self._bus.client.pipeline(transaction=False) as pipe:
                    args = [self._node_id, ttl_ms]
                    requests = [
                        self._script(keys=[self._key(name)], args=args, client=pipe)
                        for name in self._names
                    ]
                replies = {name: await r for name, r in zip(self._names, requests, strict=True)}
                held = {name for name, reply in replies.items() if held_by_us(reply)}
                taken = {name for name, reply in replies.items() if reply == TAKEN}
        except REDIS_ERRORS as exc:
            if self.held and trio.current_time() - self._renewed_at > self._ttl_s:
                log.warning("leases given up: cannot renew", held=sorted(self.held),
                            error=describe(exc))  # fmt: skip
                self.lost += len(self.held)
                self.lapsed |= self.held
                self.held = set()
            return
        self._renewed_at = trio.current_time()
        gained, lost = (held - self.held) | taken, (self.held | self.lapsed) - held
        # resumed: this node had it until now (Redis lost the key, or it could not renew)
        resumed, self.lapsed = (self.lapsed | self.held) & gained, set()
        if self.held - held:
            self.lost += len(self.held - held)
        self.held = held
        if lost:
            log.warning("leases lost", names=sorted(lost))
        for name in sorted(lost):
            self._on_lose(name)
        self._taking = set(gained)
        async with trio.open_nursery() as nursery:  # each hand-over reads Redis: at once
            for name in sorted(gained):
                nursery.start_soon(self._gain, name, name in resumed)

    async def _gain(self, name: str, resumed: bool) -> None:
        self.gained += 1
        log.info("lease taken: publishing", name=name, resumed=resumed)
        try:
            await self._on_gain(name, resumed)
        finally:
            self._taking.discard(name)
