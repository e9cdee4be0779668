"""Writing: the flusher, the drains, and coalescing.

Writing has exactly one owner per socket at a time (``Lifecycle.writer``):

- the gateway's single *flusher* task writes every dirty outlet with one non-blocking ``send``
  after the publishers of a scheduler tick have run (frames of one tick coalesce into one
  syscall per connection); it yields every ``FLUSH_SLICE_S`` so a round over thousands of
  connections never stalls the loop, and after an expensive round it may wait a little first
  (``linger_s``) so publishers' frames share each connection's one send;
- if the kernel buffer is full, the rest is left to a *drain* task started in that connection's
  nursery, which waits until the socket is writable; the flusher skips the connection meanwhile.
  A drain that sees no byte leave the kernel's send queue for ``stall_timeout_s`` ends the
  connection (slow consumer);
- once the connection's task is leaving its nursery (``Connection.leaving``: it ended, or
  failed), no drain starts there: a cancelled drain, or the flusher finding the task leaving,
  hands the socket to that task, which writes the last bytes itself.

Each write is an error boundary: one connection's failure ends that connection only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import trio

from pushd.config import LimitsConfig
from pushd.errors import PeerGone
from pushd.gateway import lifecycle
from pushd.gateway.connection import Connection, unsent_bytes
from pushd.gateway.hub import Hub
from pushd.gateway.lifecycle import Disconnect, Phase, Writer
from pushd.metrics import GatewayMetrics

FLUSH_SLICE_S = 0.002  # the flusher yields after this much work in one round
STALL_POLL_S = 0.5  # how often a drain looks at the kernel's send queue while not writable

log = structlog.get_logger("pushd.gateway.writer")

# a global: looking an Enum member up on its class costs ~50 ns on CPython 3.11 (a module
# global ~6 ns), and the flusher tests this one twice per dirty connection per round
FLUSHER = Writer.FLUSHER


def linger_s(coalesce_ms: float, now: float, last_end: float, last_round: float) -> float:
    """How long a flush round waits before it starts. When the last round was expensive (it
    took ``coalesce_ms`` or more: a big fan-out) and frames are wanted out again before the
    loop has been idle that long, publishers keep it busy (one message per publish call, say):
    waiting half a round, at most ``coalesce_ms``, lets several of their frames share each
    connection's one send, which is most of a round's cost (BENCHMARKS.md, issue 11). An idle
    loop, or cheap rounds (the market mix), flush at once."""
    limit_s = coalesce_ms / 1000
    if limit_s and last_round >= limit_s and now - last_end < last_round:
        return min(limit_s, last_round / 2)
    return 0.0


class Flusher:
    """The one task that writes dirty connections, and the drains it hands full ones to."""

    def __init__(
        self,
        hub: Hub,
        limits: LimitsConfig,
        metrics: GatewayMetrics,
        end: Callable[[Connection, Disconnect], None],
        fail: Callable[[Connection], None],
    ) -> None:
        self._hub = hub
        self._limits = limits
        self._metrics = metrics
        self._end = end
        self._fail = fail
        self._wanted = trio.Event()
        self._dirty_since = 0.0  # when the first frame of the next flush round was queued
        self.stall_max_s = 0.0  # the longest the flusher ran without yielding
        self.round_max_s = 0.0  # the longest round's writing time (all its slices)
        hub.on_dirty = self._want

    def reconfigure(self, limits: LimitsConfig) -> None:
        self._limits = limits

    def _want(self) -> None:
        self._dirty_since = time.perf_counter()
        self._wanted.set()

    async def run(self) -> None:
        clock = time.perf_counter
        last_round = 0.0  # how long the last round took, and when it ended
        last_end = 0.0
        while True:
            await self._wanted.wait()
            if wait_s := linger_s(self._limits.coalesce_ms, clock(), last_end, last_round):
                await trio.sleep(wait_s)  # the publishers run freely meanwhile
            self._wanted = trio.Event()
            dirty = self._hub.take_dirty()
            started = clock()
            self._metrics.publish_to_flush.observe(started - self._dirty_since)
            work = 0.0  # this round's time spent writing: what one unbroken round would block
            for n, outlet in enumerate(dirty, 1):
                conn: Connection = outlet.owner
                try:
                    self._flush(conn)
                except Exception:  # one connection's failure is that connection's only
                    log.exception("flush failed", conn_id=conn.conn_id, peer=conn.peer)
                    self._fail(conn)
                if not n % 64 and (elapsed := clock() - started) > FLUSH_SLICE_S:
                    self.stall_max_s = max(self.stall_max_s, elapsed)
                    work += elapsed
                    await trio.lowlevel.checkpoint()
                    started = clock()
            elapsed = clock() - started
            self.stall_max_s = max(self.stall_max_s, elapsed)
            self.round_max_s = max(self.round_max_s, work + elapsed)
            self._metrics.flush_seconds.observe(work + elapsed)
            last_round, last_end = work + elapsed, clock()

    def _flush(self, conn: Connection) -> None:
        # once per dirty connection per round: locals, the cheap tests first, one property
        outlet = conn.outlet
        if outlet.slow and conn.phase is Phase.OPEN:
            self._end(conn, lifecycle.SLOW_CONSUMER)
            return
        if not outlet.out or conn.life.writer is not FLUSHER:
            return
        try:
            conn.write_some(FLUSHER)
        except PeerGone:
            self._end(conn, lifecycle.RESET)
            return
        if outlet.out or conn.wire:  # (``conn.unsent``, without a property call)
            if conn.leaving:  # its nursery takes no drain: its task writes the rest
                conn.life.hand_to(Writer.SHELL)
                return
            assert conn.nursery is not None
            conn.life.hand_to(Writer.DRAIN)
            conn.nursery.start_soon(self._drain, conn)
        elif conn.pongs_owed or outlet.lagging or outlet.replaying:
            conn.written()  # (it has nothing else to do: not called per connection per round)

    async def _drain(self, conn: Connection) -> None:
        stall_s = self._limits.stall_timeout_s
        try:
            queued = unsent_bytes(conn.sock)
            deadline = trio.current_time() + stall_s
            while conn.unsent:
                with trio.move_on_after(STALL_POLL_S) as polled:
                    await trio.lowlevel.wait_writable(conn.sock)
                if polled.cancelled_caught:  # not writable yet: is the peer taking any bytes?
                    now_queued = unsent_bytes(conn.sock)
                    if now_queued < queued:
                        deadline = trio.current_time() + stall_s
                    queued = now_queued
                    if trio.current_time() >= deadline:
                        self._end(conn, lifecycle.STALLED)
                        return
                    continue
                conn.write_some(Writer.DRAIN)
                queued = unsent_bytes(conn.sock)
                deadline = trio.current_time() + stall_s
        except (OSError, PeerGone):  # reset while written, or gone under the ioctl
            self._end(conn, lifecycle.RESET)
            return
        except trio.Cancelled:  # its task is ending: the socket is the task's from here
            conn.life.hand_to(Writer.SHELL)
            raise
        finally:  # back to the flusher, unless its task is leaving (its nursery takes no drain)
            if conn.life.writer is Writer.DRAIN:
                conn.life.hand_to(Writer.SHELL if conn.leaving else Writer.FLUSHER)
        if conn.outlet.slow:
            self._flush(conn)
        else:
            conn.written()
