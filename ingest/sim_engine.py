"""The simulator as a running engine: steps the Market on a timer and sends its events to
pushd. Trio shell around ``ingest.sim``.

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
from ingest.transport import TcpSender, UdpSender

log = structlog.get_logger("pushd.sim")

SOURCE_MARKET = 1
SOURCE_PRIVATE = 2


class SimStats:
    def __init__(self) -> None:
        self.market_events = 0
        self.private_events = 0
        self.dropped_events = 0


async def run_feed(
    market: Market,
    *,
    host: str,
    tcp_port: int,
    udp_port: int | None,
    step_ms: int = 50,
    stats: SimStats | None = None,
) -> None:
    """Step the market every ``step_ms`` on the wall clock and send its events, until cancelled.

    Serve the engine's books alongside with ``serve_snapshots(market.book, ...)``.
    """
    stats = stats if stats is not None else SimStats()
    udp = UdpSender(host, udp_port, SOURCE_MARKET) if udp_port is not None else None
    tcp = TcpSender(host, tcp_port, SOURCE_PRIVATE)
    try:
        while True:
            market_events, private_events = market.step(int(time.time() * 1000))
            if udp is not None:
                if market_events:
                    await udp.send(market_events)
                    stats.market_events += len(market_events)
            else:
                private_events = market_events + private_events
            if private_events:
                await _send_tcp(tcp, private_events, stats)
            await trio.sleep(step_ms / 1000)
    finally:
        if udp is not None:
            udp.close()
        with trio.CancelScope(shield=True):
            await tcp.aclose()


async def _send_tcp(sender: TcpSender, events: Sequence[wire.Event], stats: SimStats) -> None:
    try:
        await sender.send(events)
        stats.private_events += len(events)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        stats.dropped_events += len(events)  # pushd sees the gap in the frame numbers
        log.warning("simulator cannot reach pushd over TCP", error=str(exc)[:120])
