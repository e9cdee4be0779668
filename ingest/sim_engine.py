"""The simulator as a running engine: steps the Market on a timer, sends its events to pushd,
and serves book snapshots. Trio shell around ``ingest.sim``.

Market data (trades, index prices) go over UDP when ``udp_port`` is given, else over TCP with
the private events; private events always go over TCP, whose delivery is reliable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog
import trio

from ingest import wire
from ingest.sim import Market
from ingest.transport import TcpSender, UdpSender, serve_snapshots

log = structlog.get_logger("pushd.sim")

SOURCE_MARKET = 1
SOURCE_PRIVATE = 2


class SimStats:
    def __init__(self) -> None:
        self.market_events = 0
        self.private_events = 0
        self.dropped_events = 0


async def run_simulator(
    market: Market,
    *,
    host: str,
    tcp_port: int,
    udp_port: int | None,
    snapshot_host: str,
    snapshot_port: int,
    step_ms: int = 50,
    stats: SimStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled; reports the snapshot server's bound port."""
    stats = stats if stats is not None else SimStats()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_snapshots, market.book, snapshot_host, snapshot_port)
        udp = UdpSender(host, udp_port, SOURCE_MARKET) if udp_port is not None else None
        private = TcpSender(host, tcp_port, SOURCE_PRIVATE)
        public = private if udp is None else None
        task_status.started(port)
        try:
            while True:
                market_events, private_events = market.step(int(time.time() * 1000))
                if udp is not None and market_events:
                    await udp.send(market_events)
                    stats.market_events += len(market_events)
                elif public is not None and market_events:
                    private_events = market_events + private_events
                if private_events:
                    await _send_tcp(private, private_events, stats)
                await trio.sleep(step_ms / 1000)
        finally:
            if udp is not None:
                udp.close()
            with trio.CancelScope(shield=True):
                await private.aclose()


async def _send_tcp(sender: TcpSender, events: Sequence[wire.Event], stats: SimStats) -> None:
    try:
        await sender.send(events)
        stats.private_events += len(events)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        stats.dropped_events += len(events)  # pushd sees the gap in the frame numbers
        log.warning("simulator cannot reach pushd over TCP", error=str(exc)[:120])
