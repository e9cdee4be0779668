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

``Link`` is the state of one role (commands, data, control): up, or down and why; ``Links``
holds a node's, and wakes whoever waits for a change. The rest is coredis adapted: ``connect``
(a client, a pool of its own), its pools and sharded pub/sub with their leaks pinned, and a
pub/sub session's connections (probed, discarded after).

coredis's private parts used here (coredis 6.9): a pub/sub session's ``_receive_stream``
(``pending_messages``: coredis has no public way to take what a session has received without a
scheduler turn per message; ``get_message(timeout=0)`` is cancelled before it looks), read with
a silent fallback and so pinned by a test of its own that fails if it disappears
(tests/test_link.py, ``test_what_coredis_received_is_read_without_waiting``); the pools' slot
queues (``Pool``, ``ClusterPool``), ``QueueFull`` and ``ShardedPubSub``'s shard tasks, which
fail loudly if they change and whose leaks tests/test_link.py reproduces.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import anyio
import coredis
import coredis.exceptions
import coredis.patterns.pubsub
import coredis.pool
import trio
from anyio.abc import TaskStatus
from coredis._concurrency import QueueFull
from coredis.connection import TCPLocation

from pushd.config import RedisBusConfig
from pushd.errors import BusUnavailable, LinkDead

# What a call to Redis raises when Redis, or the link to it, fails: to the bus an outage, to be
# waited out (and said: not ready), never a crash. Nothing else: a bug (a TypeError, a
# KeyError, a broken invariant) propagates instead of being retried forever as "Redis
# unreachable". coredis's own errors (a refused connection, a reply Redis sent as an error, a
# lost link, a Cluster that is down), the socket's (OSError, which holds the builtin
# ConnectionError and TimeoutError coredis raises for an unconfirmed subscribe), the streams'
# under coredis (anyio) and pushd's deadlines and verdicts on a link.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    LinkDead,
    BusUnavailable,
)
BACKOFF_S = (0.05, 2.0)  # reconnect backoff: first, most


def describe(exc: BaseException) -> str:
    """One short line for a log or a reply: the error's type and message (the first one
    inside a group: a nursery's wrapping says nothing)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]


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


class Links:
    """This node's links to Redis by role, and one event for a change of any of them (a
    role's state that is not a ``Link``, the publisher's, says so through ``changed``)."""

    __slots__ = ("_changed", "_links")

    def __init__(self, *names: str) -> None:
        self._links = {name: Link(name) for name in names}
        self._changed = trio.Event()  # set (and replaced) when a link goes up or down

    def link(self, name: str) -> Link:
        """The link ``name``; a new name is a link the node is not ready without."""
        return self._links.setdefault(name, Link(name))

    def mark(self, name: str, up: bool, reason: str = "") -> None:
        if self.link(name).mark(up, reason):
            self.changed()

    def changed(self) -> None:
        """Wake whoever waits for a link's change."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def states(self) -> dict[str, bool]:
        return {name: link.up for name, link in self._links.items()}

    def down(self) -> list[str]:
        """Each link that is down, and why."""
        return [f"{link.name} link: {link.reason}" for link in self._links.values() if not link.up]


def connect(config: RedisBusConfig, name: str) -> Any:
    """A client on a pool of its own, its connections named ``name`` (``CLIENT LIST``)."""
    timeout = config.timeout_s
    options: dict[str, Any] = {
        "stream_timeout": timeout, "connect_timeout": timeout, "decode_responses": False,
    }  # fmt: skip
    if config.cluster:  # from_url of a cluster warns (coredis 6.9): give the node itself
        url = urlsplit(config.url)
        # (the cluster client takes no client_name: its pool does)
        named_pool: Any = functools.partial(ClusterPool, client_name=name)
        return Cluster(
            startup_nodes=[TCPLocation(url.hostname or "127.0.0.1", url.port or 6379)],
            username=url.username, password=url.password,
            ssl=url.scheme == "rediss", **options,
            connection_pool_cls=named_pool,
        )  # fmt: skip
    pool = Pool.from_url(config.url, client_name=name, **options)
    return coredis.Redis(connection_pool=pool, decode_responses=False)


class Cluster(coredis.RedisCluster[Any]):
    """coredis's Cluster client, with its one known way of reporting a lost node as a bug
    pinned: a command sent to every primary (``SCRIPT EXISTS``, which a pipeline of scripts
    sends) whose merge meets a node's ``ConnectionError`` raises ``TypeError`` ("'ConnectionError'
    object is not iterable", coredis 6.9). That one, raised in coredis's reply merging, is a
    lost link (tests/test_cluster.py kills every node); any other ``TypeError`` is a bug."""

    async def execute_command(self, command: Any) -> Any:
        try:
            return await super().execute_command(command)
        except TypeError as exc:
            if not _raised_in_merge(exc):
                raise
            lost = f"a Cluster node did not answer: {exc}"
            raise coredis.exceptions.ConnectionError(lost) from exc


class Pool(coredis.ConnectionPool[Any]):
    """coredis's pool of one Redis, handing a closed connection's slot back. coredis 6.9
    restores the slot of a connection that ends while idle in the pool, but one handed back
    already closed (a pub/sub session the bus discards, a command whose link died) is just
    dropped, its slot with it: after ``max_connections`` (64) such, every caller waits forever
    for a connection (tests/test_link.py)."""

    def release(self, connection: Any) -> None:
        super().release(connection)
        if not connection.usable:
            with contextlib.suppress(QueueFull):
                self._available_connections.append_nowait(None)  # a new one, when needed


class ClusterPool(coredis.pool.ClusterConnectionPool):
    """coredis's pool of a Cluster, handing a closed connection's slot back (as ``Pool``,
    per node: 64 // nodes each)."""

    def release(self, connection: Any) -> None:
        super().release(connection)
        if not connection.usable:
            with contextlib.suppress(QueueFull):
                self._node_pool(connection.location).append_nowait(None)


class ShardedPubSub(coredis.patterns.pubsub.ShardedPubSub[Any]):
    """coredis's sharded pub/sub (a connection per primary), with those connections acquired
    so that a failure part-way gives back the ones already acquired. coredis 6.9 enters them
    in an ``AsyncExitStack`` it never closes: when one shard fails to connect (a link reset
    while the others connected), the others leak, each an open connection and, for good, a
    slot of the pool's per-node queue; after some twenty flaps every new session waits
    forever for a connection (tests/test_link.py). The rest is coredis's ``run``, unchanged."""

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        async def _run() -> None:
            nonlocal started
            layout = self.connection_pool.cluster_layout
            nodes = layout.replicas if self._read_from_replicas else layout.primaries
            async with contextlib.AsyncExitStack() as stack:
                self.shard_connections = {}
                for node in nodes:
                    if node.node_id:
                        acquired = self.connection_pool.acquire(node=node)
                        shard: Any = await stack.enter_async_context(acquired)
                        self.shard_connections[node.node_id] = shard
                try:
                    async with anyio.create_task_group() as tg:
                        self._current_scope = tg.cancel_scope
                        for connection in self.shard_connections.values():
                            tg.start_soon(self._consume_shard_push_messages, connection)
                            tg.start_soon(self._shard_keepalive, connection)
                        if not started:
                            task_status.started()
                            started = True
                        elif self.channels:  # resubscribe
                            await self.subscribe(*self.channels.keys())
                finally:
                    if self._current_scope.cancel_called:
                        with anyio.CancelScope(shield=True):
                            await self._cleanup()

        await self._retry_policy.call_with_retries(_run)


def _raised_in_merge(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "coredis/response/_callbacks" in frames[-1].filename


class Check(NamedTuple):
    """How the probe asks one connection: ``ping`` returns once the PING is answered;
    ``quiet`` says how long (seconds) the connection has received nothing at all."""

    ping: Callable[[], Awaitable[Any]]
    quiet: Callable[[], float]


async def probe(checks: Iterable[Check], timeout_s: float) -> None:
    """PING every connection at once; raise ``LinkDead`` if one is silent for ``timeout_s``
    before its PONG. Only silence is death: a connection whose PONG waits behind a backlog
    (a burst on a pub/sub connection, a CPU-saturated node) but that keeps receiving bytes is
    alive, and replacing it would only add a resubscribe and a catch-up to the load."""
    dead: list[Check] = []
    async with trio.open_nursery() as nursery:
        for check in checks:
            nursery.start_soon(_check, check, timeout_s, dead, nursery.cancel_scope)
    if dead:
        raise LinkDead(f"no answer to PING within {timeout_s:g} s")


async def _check(
    check: Check, timeout_s: float, dead: list[Check], probing: trio.CancelScope
) -> None:
    """Until ``check``'s connection answers, or falls silent for ``timeout_s`` (then it is
    added to ``dead`` and the probe ends)."""
    answered = trio.Event()

    async def ask() -> None:
        await check.ping()
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        wait = timeout_s
        while not answered.is_set():
            with trio.move_on_after(wait):
                await answered.wait()
            quiet = check.quiet()
            if not answered.is_set() and quiet >= timeout_s:
                dead.append(check)
                probing.cancel()
                return
            wait = timeout_s - quiet  # heard from lately: silent for timeout_s yet?


async def watch(pings: Callable[[], Iterable[Check]], interval_s: float, timeout_s: float) -> None:
    """Probe the connections ``pings`` names every ``interval_s`` until one is dead (then
    raise ``LinkDead``); for the tasks of a session, which end with it."""
    while True:
        await probe(pings(), timeout_s)
        await trio.sleep(interval_s)


# -- a pub/sub session's connections --------------------------------------------------------


def pending_messages(ps: Any) -> Callable[[], Iterator[Any]]:
    """What coredis's pub/sub object has received and not handed out yet, without waiting
    (its ``get_message`` yields to the scheduler once per message). Reads the private
    ``_receive_stream``: see the module's docstring (pinned by tests/test_link.py)."""
    stream = getattr(ps, "_receive_stream", None)

    def pending() -> Iterator[Any]:
        if stream is None:  # another coredis: one message per get_message, still correct
            return
        while True:
            try:
                yield stream.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return

    return pending


def connections(ps: Any) -> list[Any]:
    """The connections of a pub/sub session (one per shard on a Cluster)."""
    found = list(getattr(ps, "shard_connections", {}).values())
    with contextlib.suppress(Exception):  # a plain pub/sub that got no connection: none
        found.append(ps.connection)
    return found


def discard(ps: Any) -> None:
    """End a pub/sub session's connections for good: one handed back to a pool would still
    carry what it was subscribed to, and the next borrower would get that (issue 19, item 5)."""
    for connection in connections(ps):
        connection.invalidate("pub/sub session ended")


def pings(ps: Any) -> list[Check]:
    """A check for each connection of a pub/sub session (PING is answered in subscribed mode
    too; any byte the connection receives meanwhile counts as life)."""
    return [
        Check(functools.partial(_ping, connection), functools.partial(_quiet, connection))
        for connection in connections(ps)
    ]


async def _ping(connection: Any) -> None:
    # no deadline of coredis's (timeout_s): the probe's rule decides when a PONG is too late
    await connection.create_request(b"PING", timeout=math.inf)


def _quiet(connection: Any) -> float:
    """Seconds since ``connection`` last received a byte (or was opened)."""
    statistics = connection.statistics
    heard: float = max(statistics.last_byte_received_at, statistics.connected_at)
    return time.perf_counter() - heard
