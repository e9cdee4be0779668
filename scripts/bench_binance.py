"""The hub's cost per event through the Binance dialect beside pushd's own, in process (no
sockets): N subscribers of one channel, native, through one Binance view, or both; each event
a trades batch or a depth diff. Prints microseconds per event (median of --repeat runs).

    .venv/bin/python scripts/bench_binance.py --subscribers 1000 --events 2000 --repeat 5
    .venv/bin/python scripts/bench_binance.py --clock cpu   # on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgspec

from pushd.binance.dialect import frames
from pushd.binance.streams import parse
from pushd.bus.model import new_epoch
from pushd.channels import Channel
from pushd.gateway.hub import Hub, Outlet

SYMBOLS = frozenset({"BTCUSDT"})
TRADES = msgspec.Raw(msgspec.json.encode({"s": "BTCUSDT", "trades": [
    {"id": i, "price": "65000.1", "qty": "0.012", "side": "buy", "ts": 1_795_000_000_000 + i}
    for i in range(5)]}))  # fmt: skip
DIFF = msgspec.Raw(msgspec.json.encode({
    "e": "depthUpdate", "s": "BTCUSDT", "U": 1, "u": 2, "pu": 0, "checksum": 0,
    "T": 1_795_000_000_000, "bids": [[f"6500{i}.1", "0.5"] for i in range(10)],
    "asks": [[f"6510{i}.1", "0.5"] for i in range(10)]}))  # fmt: skip


def run(subscribers: int, events: int, internal: str, stream: str, data: msgspec.Raw,
        native: bool, view: bool, clock: Callable[[], float]) -> float:  # fmt: skip
    """Microseconds per published event."""
    hub = Hub()
    channel = Channel(internal, stream, private=False, symbol="BTCUSDT")
    binance = parse(stream, SYMBOLS, "spot")
    make: Callable[[], object] = lambda: frames(binance, "spot", False, hub)  # noqa: E731
    outlets = [Outlet(1 << 30) for _ in range(subscribers)]
    for outlet in outlets:
        if native:
            hub.subscribe(outlet, channel)
        if view:
            hub.join_view(outlet, channel, "k", make)  # type: ignore[arg-type]
    epoch = new_epoch()
    started = clock()
    for seq in range(1, events + 1):
        hub.publish(internal, epoch, seq, data)
        if seq % 100 == 0:
            for outlet in outlets:
                outlet.out.clear()
            hub.take_dirty()
    return (clock() - started) / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: this process's CPU time (a shared machine: time spent descheduled is not "
        "counted)",
    )  # fmt: skip
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"{args.subscribers} subscribers, {args.events} events, median of {args.repeat}, "
          f"{args.clock} clock")  # fmt: skip
    for label, internal, stream, data in (
        ("trades (5 a batch)", "trades_BTCUSDT", "btcusdt@trade", TRADES),
        ("depth diff (20 levels)", "depth_BTCUSDT", "btcusdt@depth@100ms", DIFF),
    ):
        for mode, native, view in (("native", True, False), ("binance", False, True),
                                   ("both", True, True)):  # fmt: skip
            runs = [run(args.subscribers, args.events, internal, stream, data, native, view,
                        clock)
                    for _ in range(args.repeat)]  # fmt: skip
            print(f"  {label:24} {mode:8} {statistics.median(runs):8.1f} us/event")


if __name__ == "__main__":
    main()
