"""The Redis bus: many processes and machines share channels through one Redis (or a Cluster).

One link, two roles. ``RedisBus`` is the ``Bus`` the daemon and the HTTP API hold: it opens
the node's clients (``link.connect``, a pool each: commands, ``<name>:data`` pub/sub and
``<name>:control`` pub/sub, never lent to one another), keeps the links' states (``Links``:
the node is not ready while one is down, saying which and why), PINGs the command link, and
hands the work to its two roles:

- ``publisher.Publisher``: this node's messages into Redis (the outbox, ``publish.lua``,
  confirmed batches for HTTP, the states stored for nodes without the book);
- ``follower.Follower``: what the hub wants, from Redis, whole (pub/sub, gap refill,
  catch-up after a reconnect, the stored states read for joins).

``store`` says where a channel lives in Redis and reads what Redis hands back; ``listen``
gives the control plane (``control.py``) its pub/sub session; ``lease.py`` and ``control.py``
use the command client (``client``).
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import structlog
import trio
from coredis.patterns.pubsub import ClusterPubSub, PubSub

from pushd.backoff import Backoff
from pushd.bus.follower import Carrier, Follower
from pushd.bus.link import BACKOFF_S, REDIS_ERRORS, Link, Links, connect, describe, discard, pings
from pushd.bus.link import watch as watch_link
from pushd.bus.model import Delivery, Entry, Outgoing, Position, Recovery
from pushd.bus.publisher import Publisher
from pushd.bus.store import STATE_EVERY, Store
from pushd.config import BusConfig

log = structlog.get_logger("pushd.bus.redis")


class RedisBus:
    state_every = STATE_EVERY  # depth publishes carry a snapshot this often
    follower_class = Follower  # (a test's subclass watches what reaches the follower)

    def __init__(self, hub: Delivery, config: BusConfig) -> None:
        self._config = config.redis
        self._cluster = config.redis.cluster
        self.prefix = config.redis.prefix
        self.name = f"{config.redis.prefix}-{secrets.token_hex(4)}"  # in CLIENT LIST
        self.data_name = f"{self.name}:data"
        self.control_name = f"{self.name}:control"
        # the connections this node holds, each checked by a probe of its own (link.py)
        # (``subscribe``: the pub/sub connections of the channels, ``<name>:data`` in Redis)
        self._links = Links("commands", "subscribe")
        self.store = Store(self.prefix, config.redis.timeout_s)
        self.publisher = Publisher(self._links, config)
        self.follower = self.follower_class(hub, self._links, self.store, config, self.data_name)
        self.client: Any = None
        self._control_client: Any = None  # pub/sub of the control channel only

    # -- the Bus interface: publishing ------------------------------------------------------

    def publish(self, items: Sequence[Outgoing]) -> int:
        return self.publisher.publish(items)

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        return await self.publisher.publish_confirmed(items)

    @property
    def outbox_size(self) -> int:
        return self.publisher.outbox_size

    async def drain(self, timeout_s: float) -> None:
        """Wait until the outbox is sent, or Redis is down, or ``timeout_s`` passed."""
        await self.publisher.drain(timeout_s)

    @property
    def published(self) -> int:
        return self.publisher.published

    @property
    def dropped(self) -> int:
        """Messages refused while the outbox was full (Redis unreachable)."""
        return self.publisher.dropped

    # -- the Bus interface: following -------------------------------------------------------

    def position(self, channel: str) -> Position | None:
        return self.follower.position(channel)

    def current(self, channel: str) -> tuple[Position, msgspec.Raw] | None:
        """The last state of a whole-state stream this node follows (``RedisBackplane.current``:
        what the hub sends a subscriber that lagged)."""
        return self.follower.current(channel)

    async def recover(self, channel: str, since: Position | None) -> Recovery:
        return await self.follower.recover(channel, since)

    def interest(self, channel: str) -> None:
        self.follower.interest(channel)

    def disinterest(self, channel: str) -> None:
        self.follower.disinterest(channel)

    def want_state(self, channel: str) -> None:
        """A join to a diff stream waits for the stream's state (the upstream's ``want_state``)."""
        self.follower.want_state(channel)

    def carriers(self) -> dict[str, Carrier]:
        """For every channel this node follows, the connection Redis delivers it on."""
        return self.follower.carriers()

    async def settled(self) -> None:
        """Return once the pub/sub link is up and Redis confirmed every command sent: then
        it carries exactly the channels the hub wants."""
        await self.follower.settled()

    @property
    def recovered_gaps(self) -> int:
        return self.follower.recovered_gaps

    @property
    def resyncs(self) -> int:
        return self.follower.resyncs

    # -- reads of what Redis keeps (REST) ---------------------------------------------------

    async def snapshot(self, channel: str) -> tuple[Position, msgspec.Raw | None]:
        """A state stream's stored state and the position it is exact at (REST)."""
        return await self.store.snapshot(channel)

    async def latest_state(self, channel: str) -> Recovery:
        """A diff stream's stored state and the diffs after it (``Store.latest_state``)."""
        return await self.store.latest_state(channel)

    async def history(self, channel: str, most: int) -> tuple[Position, list[Entry]]:
        """An event stream's last ``most`` messages and the position of the last (REST)."""
        return await self.store.history(channel, most)

    async def archive(self, channel: str, most: int) -> list[msgspec.Raw]:
        """The last ``most`` archived messages of ``channel`` (closed candles), oldest first."""
        return await self.store.archive(channel, most)

    # -- the links --------------------------------------------------------------------------

    def link(self, name: str) -> Link:
        """The state of one of this node's links to Redis; a new name (``control``, for
        whoever listens) is a link the node is not ready without."""
        return self._links.link(name)

    @property
    def publisher_up(self) -> bool:
        return self.publisher.up

    def links(self) -> dict[str, bool]:
        """Whether each of this node's links to Redis is up, by name (``pushd_bus_up``)."""
        return {"publish": self.publisher_up} | self._links.states()

    async def wait_changed(self) -> None:
        """Return at the next change of a link's state (up or down)."""
        await self._links.wait_changed()

    async def wait_ready(self) -> None:
        """Return once every link to Redis is up."""
        while self.not_ready() is not None:
            await self._links.wait_changed()

    def not_ready(self) -> str | None:
        down = self._links.down()
        if not self.publisher_up:
            down.insert(0, "publishing paused")
        return f"Redis unreachable ({'; '.join(down)})" if down else None

    @contextlib.asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Any]:
        """A plain pub/sub session on ``channel`` (the control plane's), on a connection that
        carries nothing else, probed (a dead one ends the session) and discarded after."""
        pool = self._control_client.connection_pool
        cls = ClusterPubSub if self._cluster else PubSub
        timeout = self._config.timeout_s
        try:
            async with cls(
                pool, ignore_subscribe_messages=True, retry_policy=None,
                subscription_timeout=timeout, unsubscription_timeout=timeout,
            ) as ps:  # fmt: skip
                try:
                    await ps.subscribe(channel)
                    self._links.mark("control", True)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            watch_link, functools.partial(pings, ps),
                            self._config.probe_interval_s, timeout,
                        )  # fmt: skip
                        yield ps
                        nursery.cancel_scope.cancel()
                finally:
                    discard(ps)
        except Exception as exc:  # (a group too) the link is down until listened to again
            self._links.mark("control", False, describe(exc))
            raise

    # -- the Trio shell ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; Redis being unreachable is a state, not an error."""
        client: Any
        self.client = client = connect(self._config, f"{self.name}:commands")
        # pub/sub on clients (pools) of their own: a pool lends a connection to whoever asks
        # next, and a pub/sub connection must never be lent to anyone
        data_client = connect(self._config, self.data_name)
        self._control_client = connect(self._config, self.control_name)
        self.store.attach(client)
        async with client, data_client, self._control_client, trio.open_nursery() as nursery:
            nursery.start_soon(self.publisher.run, client)
            await nursery.start(self.follower.run, data_client)
            nursery.start_soon(self._probe_commands)
            task_status.started()

    async def _probe_commands(self) -> None:
        """PING the command connections (every node's on a Cluster) forever; a dead one is
        replaced: the pool's connections are closed, the next command opens a new one."""
        link = self._links.link("commands")
        backoff = Backoff(*BACKOFF_S)  # while down: a new connection is tried at once
        while True:
            try:
                with trio.fail_after(self._config.timeout_s):
                    await self.client.ping()
                if not link.up:
                    log.info("Redis link up", link="commands")
                self._links.mark("commands", True)
            except trio.TooSlowError:
                error = f"no answer to PING within {self._config.timeout_s:g} s"
                if link.up:
                    log.warning("Redis link dead: replacing it", link="commands", error=error)
                self._links.mark("commands", False, error)
                self.client.connection_pool.disconnect()
            except REDIS_ERRORS as exc:
                self._links.mark("commands", False, describe(exc))
            if link.up:
                backoff.reset()
            await trio.sleep(self._config.probe_interval_s if link.up else backoff.next())
