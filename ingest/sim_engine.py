"""The simulator as a running engine: steps the Market on a timer and sends its events to
pushd. Trio shell around ``ingest.sim``.

Market data (trades, index prices) go over UDP when ``udp_port`` is given, else over TCP with
the private events; private events always go over TCP, whose delivery is reliable. Frames are
sealed with ``keys[src]`` (sources ``SOURCE_MARKET`` and ``SOURCE_PRIVATE``) when given, and a
sender with nothing to send for ``HEARTBEAT_S`` sends a heartbeat, so pushd can tell a quiet
market from a dead engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import structlog
import trio

from ingest import wire
from ingest.sim import Market
from ingest.transport import TcpSender, UdpSender

log = structlog.get_logger("pushd.sim")

SOURCE_MARKET = 1
SOURCE_PRIVATE = 2
HEARTBEAT_S = 1.0


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
    keys: Mapping[int, bytes] | None = None,
) -> None:
    """Step the market every ``step_ms`` on the wall clock and send its events, until cancelled.

    Serve the engine's books alongside with ``serve_snapshots(market.book, ...)``.
    """
    stats = stats if stats is not None else SimStats()
    keys = keys or {}
    udp = (
        UdpSender(host, udp_port, SOURCE_MARKET, key=keys.get(SOURCE_MARKET))
        if udp_port is not None
        else None
    )
    tcp = TcpSender(host, tcp_port, SOURCE_PRIVATE, key=keys.get(SOURCE_PRIVATE))
    udp_sent = tcp_sent = -math.inf
    try:
        while True:
            now = trio.current_time()
            market_events, private_events = market.step(int(time.time() * 1000))
            if udp is not None:
                if market_events:
                    await udp.send(market_events)
                    stats.market_events += len(market_events)
                    udp_sent = now
                elif now - udp_sent >= HEARTBEAT_S:
                    await udp.heartbeat()
                    udp_sent = now
            else:
                private_events = market_events + private_events
            if private_events or now - tcp_sent >= HEARTBEAT_S:
                await _send_tcp(tcp, private_events, stats)  # none: a heartbeat
                tcp_sent = now
            await trio.sleep(step_ms / 1000)
    finally:
        if udp is not None:
            udp.close()
        with trio.CancelScope(shield=True):
            await tcp.aclose()


async def _send_tcp(sender: TcpSender, events: Sequence[wire.Event], stats: SimStats) -> None:
    """Send ``events`` (none: a heartbeat)."""
    try:
        if events:
            await sender.send(events)
        else:
            await sender.heartbeat()
        stats.private_events += len(events)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        stats.dropped_events += len(events)  # pushd sees the gap in the frame numbers
        log.warning("simulator cannot reach pushd over TCP", error=str(exc)[:120])
