"""What an operator asks of the whole cluster, not of one node: over Redis, every node answers.

- **Registry.** Each node writes a heartbeat to the hash ``<prefix>:nodes`` every
  ``HEARTBEAT_S`` (field: its node id), so a node knows how many answers to wait for.
- **Control channel** ``<prefix>:control`` (plain pub/sub, which a Cluster broadcasts to every
  shard's subscribers): ``kick`` (the publish API's disconnect) and ``stats`` (``/v1/stats``):
  every node acts and pushes its answer to a reply list the asking node reads; and
  ``private_gap`` (a compute node lost engine frames that may have held private events, or
  took the private events over: every gateway tells its private subscribers, as one process
  does). Pub/sub is at-most-once and a node that just reconnected (Redis restarted) is not
  subscribed yet, so a private gap is published again every ``HEARTBEAT_S`` until every node
  in the registry has answered it (each node tells its subscribers once per gap, whatever
  the copies), for at least two heartbeats (a Redis that restarted empty has an empty registry
  until the nodes beat again), at most ``GAP_RETRY_S``.

A command is a tagged union (``Command``: ``Kick``, ``Stats``, ``PrivateGap``, tagged by
``op``), decoded once where it comes off the channel. Anyone with access to Redis can publish
there: what is not a command (not JSON, an unknown ``op``, a field of the wrong type) is logged
and dropped, and a command that fails is logged with its traceback; neither ends the loop.
An answer or a registry entry that is not one is logged too (throttled) and left out.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import trio

from pushd.backoff import Backoff
from pushd.bus.link import BACKOFF_S, REDIS_ERRORS, describe
from pushd.bus.redis import RedisBus
from pushd.errors import BusUnavailable
from pushd.logs import ThrottledLog

log = structlog.get_logger("pushd.bus.control")

HEARTBEAT_S = 1.0
FRESH_S = 5.0  # a node silent for longer is left out of the sums (it died, or is cut off)
REPLY_TTL_S = 30
GAP_RETRY_S = 30.0  # a private gap is published again until every node answered, this long
GAPS_REMEMBERED = 64  # private gaps a node knows it told (their copies are answered, not told)


class _Command(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, tag_field="op"):
    """A command on the control channel, as JSON ``{"op": <tag>, ...}``: ``reply`` is the
    list the asking node reads answers from, ``origin`` the asking node."""

    reply: str | None = None
    origin: str | None = None


class Kick(_Command, frozen=True, tag="kick"):
    """Close ``uid``'s connections on every node; each answers how many it closed."""

    uid: str


class Stats(_Command, frozen=True, tag="stats"):
    """Every node answers its counters (``NodeStats``)."""


class PrivateGap(_Command, frozen=True, tag="private_gap"):
    """Private events may have been lost (a compute node's ingest gap, or a hand-over): every
    node tells its private subscribers once per ``id`` (its copies have the same) and answers
    its node id."""

    reason: str | None = None
    id: str | None = None
    ts: float | None = None  # when the private gap was seen (wall clock, s)


Command = Kick | Stats | PrivateGap  # what the control channel carries, decoded once


class NodeStats(msgspec.Struct, frozen=True):
    node: str
    role: str
    ts: float
    stats: dict[str, Any]


_command = msgspec.json.Decoder(Command)  # the boundary: anything else is dropped, said
_node = msgspec.json.Decoder(NodeStats)


def _op(command: Command) -> str:
    """A command's tag, as it came on the wire (for logs)."""
    return str(command.__struct_config__.tag)


def new_node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class ControlPlane:
    def __init__(
        self,
        bus: RedisBus,
        role: str,
        stats: Callable[[], dict[str, Any]],
        kick: Callable[[str], int],
        private_gap: Callable[[float | None], int],
    ) -> None:
        self._bus = bus
        self._role = role
        self._stats = stats
        self._kick = kick
        self._private_gap = private_gap
        self.node_id = new_node_id()
        prefix = bus.prefix
        self._registry = f"{prefix}:nodes"
        self._channel = f"{prefix}:control"
        bus.link("control")  # a link of this node: not ready while it is down
        self._beat_log = ThrottledLog(log, "registry heartbeat not written")
        self._gap_retry_log = ThrottledLog(log, "private gap not published: retried")
        self._answer_log = ThrottledLog(log, "malformed control answer dropped")
        self._registry_log = ThrottledLog(log, "malformed registry entry skipped")
        self._gap_reason: str | None = None  # a private gap to tell (reasons of several: one)
        self._gap_at = 0.0
        self._started = time.time()  # a gap seen before this node started is not its to tell
        self._gap_wanted = trio.Event()
        self._gaps_told: deque[str] = deque(maxlen=GAPS_REMEMBERED)
        self.gaps_unconfirmed = 0  # private gaps some node never answered (in GAP_RETRY_S)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._beat()  # registered before the node reports ready
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._listen)
            nursery.start_soon(self._tell_gaps)
            task_status.started()

    async def leave(self) -> None:
        """Take this node out of the registry (shutdown)."""
        try:
            with trio.fail_after(1):
                await self._bus.client.hdel(self._registry, [self.node_id])
        except REDIS_ERRORS as exc:  # it goes stale in FRESH_S
            log.warning("node not taken out of the registry", error=describe(exc))

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT_S)
            await self._beat()

    async def _beat(self) -> None:
        entry = NodeStats(self.node_id, self._role, time.time(), self._stats())
        try:
            with trio.fail_after(HEARTBEAT_S * 2):
                await self._bus.client.hset(
                    self._registry, {self.node_id: msgspec.json.encode(entry)}
                )
        except REDIS_ERRORS as exc:  # this node's registry entry goes stale: others skip it
            self._beat_log.warning(error=describe(exc))

    async def _listen(self) -> None:
        backoff = Backoff(*BACKOFF_S)
        while True:
            listened = False
            try:
                async with self._bus.listen(self._channel) as ps:  # a connection of its own
                    listened = True
                    backoff.reset()  # a link that was up: when lost, listened to again at once
                    while True:
                        message = await ps.get_message()
                        if message is not None and message["type"] in ("message", b"message"):
                            await self._obey(message["data"])
            except* REDIS_ERRORS as group:
                if listened:
                    log.warning("Redis control link lost: listening again", link="control",
                                error=describe(group))  # fmt: skip
            await trio.sleep(backoff.next())

    async def _obey(self, payload: bytes) -> None:
        """Do one command from the control channel. One that is not a command (anyone with
        access to Redis can publish there) is logged and dropped; one that fails (a bug) is
        logged with its traceback. Neither ends the loop: the node obeys on."""
        try:
            command = _command.decode(payload)
        except (msgspec.DecodeError, RecursionError) as exc:  # (a ValidationError too)
            log.warning("control command dropped", error=str(exc)[:200], size=len(payload))
            return
        try:
            await self._do(command)
        except Exception:
            log.exception("control command failed", op=_op(command), origin=command.origin)

    async def _do(self, command: Command) -> None:
        match command:
            case Kick(uid=uid):
                await self._answer(command, str(self._kick(uid)).encode())
            case Stats():
                entry = NodeStats(self.node_id, self._role, time.time(), self._stats())
                await self._answer(command, msgspec.json.encode(entry))
            case PrivateGap():
                await self._told(command)
                await self._answer(command, self.node_id.encode())

    async def _told(self, gap: PrivateGap) -> None:
        """Tell this node's private subscribers of ``gap``, once per gap, unless it was seen
        before this node started (its subscribers came after it)."""
        if gap.ts is not None and gap.ts < self._started:
            return
        if gap.id is not None and gap.id in self._gaps_told:
            return
        if gap.id is not None:
            self._gaps_told.append(gap.id)
        told = self._private_gap(gap.ts)  # (channels followed since: not told)
        log.info("private gap told", origin=gap.origin, reason=gap.reason, notices=told)

    async def _answer(self, command: Command, answer: bytes) -> None:
        """Push this node's answer for the asking node; one Redis refuses (or an outage) is
        logged: the asker counts one node less."""
        if command.reply is None:
            return
        try:
            with trio.fail_after(HEARTBEAT_S * 2):
                await self._bus.client.rpush(command.reply, [answer])
                await self._bus.client.expire(command.reply, REPLY_TTL_S)
        except REDIS_ERRORS as exc:
            log.warning("control answer not sent", op=_op(command), origin=command.origin,
                        error=describe(exc))  # fmt: skip

    def private_gap(self, reason: str) -> None:
        """Tell every node's private subscribers (this one's too, through the channel), after
        now: a gap noticed while one is being told is told again afterwards."""
        self._gap_reason, self._gap_at = reason, time.time()
        self._gap_wanted.set()

    async def _tell_gaps(self) -> None:
        while True:
            await self._gap_wanted.wait()
            self._gap_wanted = trio.Event()
            reason, self._gap_reason = self._gap_reason, None
            await self._tell_gap(reason or "", self._gap_at)

    async def _tell_gap(self, reason: str, at: float) -> None:
        """Publish one private gap until every node in the registry answered it (a node that
        started after it answers without telling: its subscribers came after the gap)."""
        token = secrets.token_hex(8)
        reply = f"{self._bus.prefix}:reply:{token}"
        command = PrivateGap(reason=reason, origin=self.node_id, reply=reply, id=token, ts=at)
        answered: set[str] = set()
        started = trio.current_time()
        while True:
            try:  # a round that fails (an outage) is said, and retried at the pace below
                with trio.move_on_after(HEARTBEAT_S * 2):
                    await self._bus.client.publish(self._channel, msgspec.json.encode(command))
                    while got := await self._bus.client.blpop([reply], timeout=HEARTBEAT_S):
                        answered.add(got[1].decode(errors="replace"))
            except REDIS_ERRORS as exc:
                self._gap_retry_log.warning(reason=reason, error=describe(exc))
            try:
                missing = {n.node for n in await self.nodes()} - answered
                if not missing and trio.current_time() - started >= 2 * HEARTBEAT_S:
                    return
            except BusUnavailable as exc:
                self._gap_retry_log.warning(reason=reason, error=str(exc)[:200])
            if trio.current_time() - started > GAP_RETRY_S:
                self.gaps_unconfirmed += 1
                log.warning("private gap not confirmed by every node", reason=reason,
                            answered=len(answered))  # fmt: skip
                return
            await trio.sleep(HEARTBEAT_S)  # the retry's pace

    async def kick(self, uid: str) -> tuple[int, int]:
        """Close ``uid``'s connections on every node; returns (closed, nodes that answered)."""
        answers = await self._ask(Kick(uid=uid))
        counts = []
        for answer in answers:  # from Redis: checked
            if answer.isdigit() and len(answer) <= 9:
                counts.append(int(answer))
            else:
                self._answer_log.warning(op="kick", size=len(answer))
        return sum(counts), len(answers)

    async def stats(self) -> list[NodeStats]:
        """Every node's counters, as each node has them now."""
        answers = await self._ask(Stats())
        entries = []
        for answer in answers:
            try:
                entries.append(_node.decode(answer))
            except (msgspec.DecodeError, RecursionError):
                self._answer_log.warning(op="stats", size=len(answer))
        return sorted(entries, key=lambda e: e.node)

    async def _ask(self, command: Command) -> list[bytes]:
        """Publish ``command`` to every node and collect the answers of those in the
        registry (for at most two heartbeats: a node that died meanwhile does not answer)."""
        expected = len(await self.nodes())
        reply = f"{self._bus.prefix}:reply:{secrets.token_hex(8)}"
        command = msgspec.structs.replace(command, reply=reply, origin=self.node_id)
        client = self._bus.client
        answers: list[bytes] = []
        try:
            with trio.fail_after(HEARTBEAT_S * 2):
                await client.publish(self._channel, msgspec.json.encode(command))
            with trio.move_on_after(HEARTBEAT_S * 2):
                while len(answers) < expected:
                    got = await client.blpop([reply], timeout=HEARTBEAT_S * 2)
                    if got is None:
                        break
                    answers.append(got[1])
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        return answers

    async def nodes(self) -> list[NodeStats]:
        """The nodes that reported within ``FRESH_S``."""
        try:
            with trio.fail_after(HEARTBEAT_S * 2):
                raw = await self._bus.client.hgetall(self._registry)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(describe(exc)) from None
        now = time.time()
        fresh = []
        for value in raw.values():
            try:
                entry = _node.decode(value)
            except (msgspec.DecodeError, RecursionError):
                self._registry_log.warning(size=len(value))
                continue
            if now - entry.ts <= FRESH_S:
                fresh.append(entry)
        return sorted(fresh, key=lambda e: e.node)
