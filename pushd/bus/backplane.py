"""The node's backplane: what differs between one process and a cluster, behind one interface.

The daemon builds one at its composition root (``pushd.daemon``) and hands it to the hub (as
its ``model.Upstream``) and to the HTTP API; nothing else asks which bus runs. A backplane:

- follows what the hub follows (``interest``, ``disinterest``, ``want_state``, ``position``)
  and is **the one source of a stream's current state**: ``current`` (sync, what this node
  holds: the hub's first event for a new subscriber, and a lagging one's state) and
  ``snapshot`` (REST, and anything else that serves a state with its seq: the same state a
  fresh subscriber of this node starts from, at the same position);
- reads the rest of what REST serves: an event stream's last messages (``recent``), a kline
  channel's closed candles (``archived``);
- does what an operator asks of the whole cluster: ``kick`` a user, ``stats``, and tells the
  private subscribers of a ``private_gap``; says which node publishes what (``leads``,
  ``keeps``);
- runs what it needs (``run``), leaves at shutdown (``leave``) and says why it cannot deliver
  (``not_ready``).

Two kinds. ``LocalBackplane``: one process on the memory bus; the node is the cluster, the
market states are the ones this process computes (``Computed``: ``Markets``). ``RedisBackplane``:
the Redis bus, the control plane (cluster-wide commands) and the leases (which compute node
publishes); states are the ones the compute nodes store beside the seqs, read back from Redis,
so a gateway without the book serves exactly what its subscribers start from.
"""

from __future__ import annotations

import math
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import structlog
import trio

from pushd.bus.control import ControlPlane
from pushd.bus.lease import PRIVATE, Leases
from pushd.bus.memory import MemoryBus
from pushd.bus.model import Bus, Entry, Position, Recovery, Snapshot, Upstream
from pushd.bus.redis import RedisBus
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.backplane")

SUMMED = ("connections", "channels", "subscriptions", "published", "delivered", "dropped")
HIGHEST = ("flush_stall_max_ms", "flush_round_max_ms")


def _number(value: object) -> int | float:
    """A counter as a node answered it, or 0 where it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return value if math.isfinite(value) else 0


class Node(Protocol):
    """What the cluster asks of this node's clients' side (the gateway satisfies it)."""

    def kick(self, uid: str) -> int:
        """Close every connection logged in as ``uid``; returns how many."""

    def stats(self) -> dict[str, Any]:
        """This node's counters."""

    def resync_private(self, gap_at: float | None = None) -> int:
        """Tell the private subscribers events may be lost; returns how many were told."""


class Computed(Protocol):
    """The market states one process computes (``Markets`` satisfies it)."""

    def current(self, internal: str) -> Snapshot | None: ...

    def recent(self, internal: str, most: int) -> list[msgspec.Raw]: ...

    def archived(self, internal: str, most: int) -> list[msgspec.Raw]: ...

    def book_stale(self, symbol: str) -> bool: ...


class Backplane(Upstream, Protocol):
    """See the module's docstring. Reads that need Redis raise ``BusUnavailable``."""

    @property
    def bus(self) -> Bus:
        """Where this node publishes (and the gateway recovers from)."""

    async def snapshot(self, channel: str) -> Snapshot:
        """A state stream's state as a fresh subscriber of this node starts from it, exactly
        at its position (``data`` None: no state yet, and where the stream stands)."""

    async def latest_state(self, channel: str) -> Recovery:
        """A diff stream's latest state as ``Recovery.current``: a state, then the diffs
        after it (empty: no state yet)."""

    async def recent(self, channel: str, most: int) -> tuple[Position, list[msgspec.Raw]]:
        """An event stream's last messages (at most ``most``, oldest first) and where the
        last stands."""

    async def archived(self, channel: str, most: int) -> list[msgspec.Raw]:
        """A kline channel's last ``most`` closed candles, oldest first."""

    def book_stale(self, symbol: str) -> bool:
        """Whether this node knows ``symbol``'s book may be behind the engine's."""

    def leads(self, name: str) -> bool:
        """Whether this node publishes ``name`` (a symbol, or ``lease.PRIVATE``)."""

    def keeps(self, name: str) -> bool:
        """Whether this node, not publishing ``name`` now, keeps what it computes of it for a
        hand-over (it had the lease until Redis stopped answering, or is taking it)."""

    async def kick(self, uid: str) -> dict[str, int]:
        """Close ``uid``'s connections on every node: ``closed`` (and ``nodes`` answering)."""

    async def stats(self) -> dict[str, Any]:
        """The cluster's counters (each node's too, where there are several)."""

    def private_gap(self, reason: str, *, leading: bool = False) -> None:
        """Private events may be lost (``leading``: this node just took them over): tell every
        private subscriber in the cluster, never leave them silently short."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ready once started."""

    async def leave(self, grace_s: float) -> None:
        """Shutdown: what was published goes out (up to ``grace_s``), the node leaves."""

    def not_ready(self) -> str | None:
        """Why this node cannot deliver now, or None."""


B = TypeVar("B", bound=Bus)


class _OnBus(Generic[B]):
    """What both kinds pass straight to their bus (``bus``, of its own type): what the hub
    follows, where channels stand, whether it can deliver."""

    def __init__(self, bus: B) -> None:
        self.bus = bus
        self._gap_log = ThrottledLog(log, "private events may be lost: subscribers told")

    def interest(self, channel: str) -> None:
        self.bus.interest(channel)

    def disinterest(self, channel: str) -> None:
        self.bus.disinterest(channel)

    def position(self, channel: str) -> Position | None:
        return self.bus.position(channel)

    def not_ready(self) -> str | None:
        return self.bus.not_ready()


class LocalBackplane(_OnBus[MemoryBus]):
    """One process: the memory bus, this node's gateway is every client, and the states are
    the ones this process computes."""

    def __init__(self, bus: MemoryBus, node: Node, computed: Computed) -> None:
        super().__init__(bus)
        self._node = node
        self._computed = computed

    def want_state(self, channel: str) -> None:
        pass  # the hub offers the books' next state itself (``Hub.publish``)

    def current(self, channel: str) -> Snapshot | None:
        return self._computed.current(channel)

    async def snapshot(self, channel: str) -> Snapshot:
        current = self._computed.current(channel)
        return current if current is not None else Snapshot(self.bus.position(channel), None)

    async def latest_state(self, channel: str) -> Recovery:
        current = self._computed.current(channel)  # this process's book: always the latest
        if current is None or current.data is None:
            return Recovery(self.bus.position(channel), recovered=False)
        at = current.position
        return Recovery(at, recovered=False, current=(Entry(at.seq, current.data),))

    async def recent(self, channel: str, most: int) -> tuple[Position, list[msgspec.Raw]]:
        return self.bus.position(channel), self._computed.recent(channel, most)

    async def archived(self, channel: str, most: int) -> list[msgspec.Raw]:
        return self._computed.archived(channel, most)

    def book_stale(self, symbol: str) -> bool:
        return self._computed.book_stale(symbol)

    def leads(self, name: str) -> bool:
        return True

    def keeps(self, name: str) -> bool:
        return False

    async def kick(self, uid: str) -> dict[str, int]:
        return {"closed": self._node.kick(uid)}

    async def stats(self) -> dict[str, Any]:
        return self._node.stats()

    def private_gap(self, reason: str, *, leading: bool = False) -> None:
        told = self._node.resync_private()
        self._gap_log.warning(reason=reason, notices=told)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.bus.run(task_status=task_status)  # forgets quiet channels

    async def leave(self, grace_s: float) -> None:
        pass


class RedisBackplane(_OnBus[RedisBus]):
    """Many processes and machines: the Redis bus, the control plane and, on a compute node,
    the leases. States come from Redis (a gateway has no book), the cluster answers through
    the control channel."""

    def __init__(self, bus: RedisBus, control: ControlPlane, leases: Leases | None) -> None:
        super().__init__(bus)
        self._control = control
        self._leases = leases

    def want_state(self, channel: str) -> None:
        self.bus.want_state(channel)

    def current(self, channel: str) -> Snapshot | None:
        """The last whole state this node followed (a new subscriber starts from the stored
        state its recovery reads; this one serves a lagging subscriber)."""
        held = self.bus.current(channel)
        return Snapshot(*held) if held is not None else None

    async def snapshot(self, channel: str) -> Snapshot:
        """The stored state, read by the script that answers a subscriber's recovery."""
        return Snapshot(*await self.bus.snapshot(channel))

    async def latest_state(self, channel: str) -> Recovery:
        return await self.bus.latest_state(channel)

    async def recent(self, channel: str, most: int) -> tuple[Position, list[msgspec.Raw]]:
        at, entries = await self.bus.history(channel, most)
        return at, [entry.data for entry in entries]

    async def archived(self, channel: str, most: int) -> list[msgspec.Raw]:
        return await self.bus.archive(channel, most)

    def book_stale(self, symbol: str) -> bool:
        return False  # a stored book says so itself

    def leads(self, name: str) -> bool:
        return self._leases is None or self._leases.leads(name)

    def keeps(self, name: str) -> bool:
        return self._leases is not None and self._leases.keeps(name)

    async def kick(self, uid: str) -> dict[str, int]:
        closed, nodes = await self._control.kick(uid)
        return {"closed": closed, "nodes": nodes}

    async def stats(self) -> dict[str, Any]:
        """Each node's answer as it gave it; in the sums, a counter that is not a number (an
        answer read back from Redis: another version's, or planted) counts nothing."""
        nodes = await self._control.stats()
        totals: dict[str, Any] = {}
        for key in SUMMED:
            totals[key] = sum(int(_number(node.stats.get(key))) for node in nodes)
        for key in HIGHEST:
            totals[key] = max((float(_number(node.stats.get(key))) for node in nodes), default=0.0)
        listed = [{"node": n.node, "role": n.role, **n.stats} for n in nodes]
        return {**totals, "nodes": listed}

    def private_gap(self, reason: str, *, leading: bool = False) -> None:
        """With Redis the subscribers are on every gateway: the control channel tells them;
        with two compute nodes, the one that publishes private events tells."""
        if not (leading or self.leads(PRIVATE)):
            return
        self._control.private_gap(reason)
        self._gap_log.warning(reason=reason, notices="every node")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run)
            await nursery.start(self._control.run)
            if self._leases is not None:
                await nursery.start(self._leases.run)
            task_status.started()

    async def leave(self, grace_s: float) -> None:
        await self.bus.drain(grace_s)  # what was published goes out
        await self._control.leave()
