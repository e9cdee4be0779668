"""The Redis bus's publisher: this node's messages into Redis, numbered there.

Messages go through one Lua script (``lua/publish.lua``) that, atomically, bumps the channel's
seq in its meta hash (creating the hash with a new epoch if it is missing), appends the
messages to the channel's bounded history stream, stores the stream's state where the message
carries one (``Outgoing.state``: every ticker, kline and markPrice event is the whole state;
depth attaches a snapshot every ``STATE_EVERY`` diffs) and PUBLISHes (SPUBLISH on a Cluster)
``["<epoch>",<first seq>,[<data>,...]]``: consecutive messages of one channel in one call and
one pub/sub message. Publishers queue messages in an outbox that one task sends in pipelined
batches. While Redis is unreachable the outbox keeps up to ``bus.redis.outage_buffer``
messages, then drops new ones (counted); ``/readyz`` says why. A confirmed publish (HTTP)
waits for its seqs and is never split across two round trips; during an outage it is told
at once (503) instead of waiting it out.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import coredis.exceptions
import structlog
import trio

from pushd.backoff import Backoff
from pushd.bus.link import BACKOFF_S, REDIS_ERRORS, Links, describe
from pushd.bus.model import Outgoing, Position, new_epoch
from pushd.bus.store import (
    ARCHIVE_SIZE,
    DIFF_HISTORY,
    META_TTL_S,
    Keys,
    decode_published,
    lua_script,
)
from pushd.channels import StateKind, state_kind
from pushd.config import BusConfig
from pushd.errors import BusUnavailable, MalformedData
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.redis")

BATCH = 512  # messages per pipelined round trip

_PUBLISH_LUA = lua_script("publish.lua")


class _Waiter:
    """A confirmed publish: every one of its messages carries it."""

    __slots__ = ("count", "done", "error", "positions")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.positions: list[Position] = []
        self.error: str | None = None


class Publisher:
    def __init__(self, links: Links, config: BusConfig) -> None:
        self._links = links
        self._config = config.redis
        self._history_size = config.history_size
        self._history_age_ms = int(config.history_age_s * 1000)
        self._publish_command = "spublish" if config.redis.cluster else "publish"
        self.prefix = config.redis.prefix
        self._outbox: deque[tuple[Outgoing, _Waiter | None]] = deque()
        self._outbox_wanted = trio.Event()
        self._sent = trio.Event()  # set (and replaced) after each batch Redis took
        self._publish_sha: str | None = None  # loaded before a batch, after every failure
        self._up = False
        self.client: Any = None
        self.published = 0
        self.dropped = 0  # messages refused while the outbox was full (Redis unreachable)
        self._drop_log = ThrottledLog(log, "Redis unreachable: outbox full, messages dropped")
        # a broken or impostor server can answer every batch so: one line a second
        self._shape_log = ThrottledLog(log, "Redis answered a publish out of shape: batch dropped")

    @property
    def up(self) -> bool:
        """Whether Redis takes this node's messages now (the ``publish`` link)."""
        return self._up

    @up.setter
    def up(self, up: bool) -> None:
        self._up, was = up, self._up
        if was != up:
            self._links.changed()

    def publish(self, items: Sequence[Outgoing]) -> int:
        """Into the outbox, as far as it has room; returns how many (the first ones) went."""
        room = self._config.outage_buffer - len(self._outbox)
        if room < len(items):
            self.dropped += len(items) - max(room, 0)
            self._drop_log.warning(dropped=self.dropped, outbox=len(self._outbox))
            items = items[: max(room, 0)]
        self._outbox.extend((item, None) for item in items)
        if items:
            self._outbox_wanted.set()
        return len(items)

    async def publish_confirmed(self, items: Sequence[Outgoing]) -> list[Position]:
        if not items:
            return []
        if not self.up:
            raise BusUnavailable("Redis unreachable")
        waiter = _Waiter(len(items))
        self._outbox.extend((item, waiter) for item in items)
        self._outbox_wanted.set()
        with trio.move_on_after(self._config.timeout_s * 2):
            await waiter.done.wait()
        if not waiter.done.is_set() or waiter.error is not None:
            raise BusUnavailable(waiter.error or "Redis did not answer in time")
        return waiter.positions

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    async def drain(self, timeout_s: float) -> None:
        """Wait until the outbox is sent, or Redis is down, or ``timeout_s`` passed."""
        with trio.move_on_after(timeout_s):
            while self._outbox and self.up:
                await self._sent.wait()

    def _fail_waiters(self, error: str) -> None:
        """Confirmed publishes do not wait out an outage: they are told at once (HTTP 503),
        and their messages leave the outbox (the caller was told no). Others stay queued."""
        failed = {waiter for _, waiter in self._outbox if waiter is not None}
        if failed:
            self._outbox = deque(entry for entry in self._outbox if entry[1] is None)
            for waiter in failed:
                waiter.error = error
                waiter.done.set()

    # -- the Trio shell ---------------------------------------------------------------------

    async def run(self, client: Any) -> None:
        """Send the outbox through ``client`` until cancelled; Redis being unreachable is a
        state (``up``), not an error."""
        self.client = client
        backoff = Backoff(*BACKOFF_S)
        while not self.up:  # know whether Redis answers before anything is sent
            try:
                with trio.fail_after(self._config.timeout_s):
                    await client.ping()
                self.up = True
            except REDIS_ERRORS as exc:
                log.warning("Redis unreachable", url=self._config.url, error=describe(exc))
                await trio.sleep(backoff.next())
        while True:
            await self._outbox_wanted.wait()
            if not self._outbox:
                self._outbox_wanted = trio.Event()
                continue
            batch = self._next_batch()
            try:
                results = await self._send(batch)
            except coredis.exceptions.NoScriptError:  # Redis lost its scripts: load, send again
                self._publish_sha = None
                continue
            except MalformedData as exc:  # no real Redis answers so; the scripts may have run,
                # so the batch is not sent again (twice published): dropped, its waiters told
                self._shape_log.error(error=str(exc)[:200], messages=len(batch))
                self._publish_sha = None  # loaded afresh for the next batch
                self._drop_batch(batch, "Redis answered out of shape")
                continue
            except REDIS_ERRORS as exc:
                self._publish_sha = None
                if self.up:
                    log.warning("Redis unreachable: publishing paused", error=describe(exc))
                self.up = False
                self._fail_waiters(str(exc)[:200])
                await trio.sleep(backoff.next())
                continue
            if not self.up:
                log.info("Redis reachable: publishing")
            self.up = True
            backoff.reset()
            for (_, waiter), at in zip(batch, results, strict=True):
                self._outbox.popleft()
                if waiter is not None:
                    waiter.positions.append(at)
                    if len(waiter.positions) == waiter.count:
                        waiter.done.set()
            self.published += len(batch)
            self._sent.set()
            self._sent = trio.Event()

    def _drop_batch(self, batch: list[tuple[Outgoing, _Waiter | None]], error: str) -> None:
        for _, waiter in batch:
            self._outbox.popleft()
            if waiter is not None and not waiter.done.is_set():
                waiter.error = error
                waiter.done.set()
        self.dropped += len(batch)

    def _next_batch(self) -> list[tuple[Outgoing, _Waiter | None]]:
        """The head of the outbox, up to ``BATCH``: a confirmed batch (HTTP) goes in one
        round trip, never split across two."""
        outbox = self._outbox
        count = min(BATCH, len(outbox))
        while (
            count < len(outbox)
            and outbox[count][1] is not None
            and outbox[count][1] is outbox[count - 1][1]
        ):
            count += 1
        return [outbox[i] for i in range(count)]

    async def _send(self, batch: list[tuple[Outgoing, _Waiter | None]]) -> list[Position]:
        """One script call per run of messages on one channel, all in one round trip; a run
        goes out as one pub/sub message, so a burst reaches each client in one write."""
        runs = [list(run) for _, run in itertools.groupby(
            (item for item, _ in batch), key=lambda item: item.channel)]  # fmt: skip
        with trio.fail_after(self._config.timeout_s):
            if self._publish_sha is None:  # (again: a restarted Redis has no scripts)
                self._publish_sha = await self.client.script_load(_PUBLISH_LUA)
            # plain EVALSHA: a pipeline of Script objects asks SCRIPT EXISTS every round trip
            async with self.client.pipeline(transaction=False) as pipe:
                requests = [self._publish_request(pipe, run) for run in runs]
            positions = []
            for run, request in zip(runs, requests, strict=True):
                epoch, first = decode_published(await request)
                positions += [Position(epoch, first + i) for i in range(len(run))]
            return positions

    def _publish_request(self, pipe: Any, run: list[Outgoing]) -> Any:
        keys = Keys(self.prefix, run[0].channel)
        kind = state_kind(run[0].channel)
        size = {StateKind.EVENTS: self._history_size, StateKind.DIFF: DIFF_HISTORY}.get(kind, 0)
        args: list[Any] = [
            keys.pubsub, new_epoch(), size, self._history_age_ms, META_TTL_S,
            self._publish_command, "1" if kind is StateKind.WHOLE else "0", ARCHIVE_SIZE,
        ]  # fmt: skip
        for item in run:
            state = bytes(item.state) if item.state is not None else b""
            args += [bytes(item.data), state, "1" if item.archive else ""]
        keys_ = [keys.meta, keys.hist, keys.archive]
        return pipe.evalsha(self._publish_sha, keys=keys_, args=args)
