#!/usr/bin/env python3
"""What a new depth subscriber costs the server: the 500-level snapshot it gets first.

    .venv/bin/python scripts/bench_subscribe.py --subscribers 5000 --repeat 5

In process, through the real Markets and Hub (no sockets: a subscriber is an outlet), with a
book from the simulated engine. Prints microseconds per subscriber (median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

from ingest.sim import Market
from pushd.bus.memory import MemoryBus
from pushd.bus.model import Snapshot
from pushd.channels import Channel
from pushd.config import MarketConfig
from pushd.gateway.hub import Detached, Hub, Outlet
from pushd.market.markets import Markets

DEPTH = Channel("depth_BTCUSDT", "BTCUSDT@depth", private=False, symbol="BTCUSDT")


class Books(Detached):
    """The hub's upstream here: the books' states, as ``LocalBackplane.current`` gives them."""

    def __init__(self, markets: Markets) -> None:
        self._markets = markets

    def current(self, channel: str) -> Snapshot | None:
        return self._markets.current(channel)


def run(subscribers: int, levels: int) -> tuple[float, int]:
    hub = Hub()
    markets = Markets({"BTCUSDT": MarketConfig()}, MemoryBus(hub, 200, 300.0), lambda _: None)
    hub.attach(Books(markets))
    engine = Market(seed=1)
    engine.step(1000)
    markets.book(engine.book("BTCUSDT", levels, 1))
    outlets = [Outlet(1 << 20) for _ in range(subscribers)]
    start = time.perf_counter()
    for outlet in outlets:
        hub.subscribe(outlet, DEPTH)
    elapsed = time.perf_counter() - start
    return elapsed / subscribers * 1e6, len(outlets[0].out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--levels", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = [run(args.subscribers, args.levels) for _ in range(args.repeat)]
    micros = statistics.median(us for us, _ in runs)
    print(
        f"depth subscribe: {micros:.1f} us per subscriber (median of {args.repeat}), "
        f"snapshot frame {runs[0][1]:,} B, {args.subscribers} subscribers"
    )


if __name__ == "__main__":
    main()
