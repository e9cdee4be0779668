"""The book-snapshot poller: asks the engine for each symbol's book every N ms. Trio shell.

One TCP connection to the engine's snapshot server, one request in flight at a time, each under
``request_timeout_s``. When the engine cannot be reached the poller logs it once, sets the
``pushd_engine_up`` gauge to 0, and reconnects with exponential backoff; when it is back, one
line says so. ``refresh(symbol)`` asks for a symbol's book at once (after an ingest gap).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping

import structlog
import trio

from ingest import wire
from pushd.backoff import Backoff
from pushd.config import EngineConfig, MarketConfig
from pushd.errors import EngineUnavailable

log = structlog.get_logger("pushd.feed.poller")

POLLER_SOURCE_ID = 0


class SnapshotPoller:
    def __init__(
        self,
        config: EngineConfig,
        markets: Mapping[str, MarketConfig],
        on_book: Callable[[wire.BookSnapshot], None],
    ) -> None:
        self._config = config
        self._markets = markets
        self._on_book = on_book
        self._due: dict[str, float] = dict.fromkeys(markets, 0.0)
        self._got: dict[str, float] = {}  # symbol -> trio time of its last snapshot
        self._wake = trio.Event()
        self._request_ids = itertools.count(1)
        self._seqs = itertools.count(1)
        self._epoch = time.time_ns()
        self.up = False
        self.snapshots = 0
        self.failures = 0
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of ``up`` or ``failures`` (for health checks and tests)."""
        await self._changed.wait()

    def _set_state(self, *, up: bool, failed: bool = False) -> None:
        if failed:
            self.failures += 1
        if failed or up != self.up:
            self.up = up
            self._changed.set()
            self._changed = trio.Event()

    def age(self, symbol: str) -> float:
        """Seconds since the symbol's last book snapshot arrived (inf before the first)."""
        got = self._got.get(symbol)
        return float("inf") if got is None else trio.current_time() - got

    def reconfigure(self, markets: Mapping[str, MarketConfig]) -> None:
        """A reload: each symbol's depth interval from its next poll on."""
        self._markets = markets

    def refresh(self, symbol: str) -> None:
        if symbol in self._due:
            self._due[symbol] = 0.0
            self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(self._config.reconnect_initial_s, self._config.reconnect_max_s)
        reported_down = False
        while True:
            try:
                with trio.fail_after(self._config.request_timeout_s):
                    stream = await trio.open_tcp_stream(
                        self._config.snapshot_host, self._config.snapshot_port
                    )
            except (OSError, trio.TooSlowError) as exc:
                self._set_state(up=False, failed=True)
                if not reported_down:
                    cfg = self._config
                    log.warning(
                        "engine snapshot server unreachable",
                        error=str(exc)[:200],
                        address=f"{cfg.snapshot_host}:{cfg.snapshot_port}",
                    )
                    reported_down = True
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            reported_down = False
            log.info("engine snapshot server connected")
            try:
                async with stream:
                    await self._poll(stream)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, EngineUnavailable,
                    wire.WireError) as exc:  # fmt: skip
                self._set_state(up=False, failed=True)
                log.warning("engine snapshot connection lost", error=repr(exc)[:200])
            await trio.sleep(backoff.delay)  # (the first: it was reset on connecting)

    async def _poll(self, stream: trio.SocketStream) -> None:
        decoder = wire.StreamDecoder()
        while True:
            symbol = min(self._due, key=self._due.__getitem__)
            with trio.move_on_at(self._due[symbol]):
                await self._wake.wait()
                self._wake = trio.Event()
                continue  # a refresh came in: look again for the most due symbol
            market = self._markets[symbol]
            request_id = next(self._request_ids)
            request = wire.BookRequest(symbol, request_id, depth=market.depth_levels)
            envelope = wire.Envelope(POLLER_SOURCE_ID, self._epoch, next(self._seqs), [request])
            with trio.fail_after(self._config.request_timeout_s):
                await stream.send_all(wire.frame_tcp(envelope))
                snapshot = await self._answer(stream, decoder, request_id)
            self._set_state(up=True)
            self.snapshots += 1
            self._got[symbol] = trio.current_time()
            self._due[symbol] = trio.current_time() + market.depth_interval_ms / 1000
            self._on_book(snapshot)

    @staticmethod
    async def _answer(
        stream: trio.SocketStream, decoder: wire.StreamDecoder, request_id: int
    ) -> wire.BookSnapshot:
        while True:
            while (frame := decoder.next_frame()) is not None:
                for event in frame.events:
                    if isinstance(event, wire.BookSnapshot) and event.request_id == request_id:
                        return event
            data = await stream.receive_some(1 << 20)
            if not data:
                raise EngineUnavailable("engine closed the snapshot connection")
            decoder.feed(data)
