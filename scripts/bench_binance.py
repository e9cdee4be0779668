"""The hub's cost per event through the Binance dialect beside pushd's own, in process (no
sockets): N subscribers of one channel, native, through one Binance view, or both; each event
a trades batch or a depth diff. Prints microseconds per event (median of --repeat runs).

Then the all-market streams (``!miniTicker@arr``, ``!ticker@arr``, ``!markPrice@arr``): N
followers, --symbols symbols each changing once a second; the cost of one second (each
symbol's event through the hub's tap, then the interval's array made and queued to every
follower), the taps alone (no follower: what an event costs), and the same data through the
per-symbol views (every follower subscribed to each symbol's ``<s>@miniTicker``: one event
per symbol, encoded once, queued to each).

    .venv/bin/python scripts/bench_binance.py --subscribers 1000 --events 2000 --repeat 5 \
        --symbols 100
    .venv/bin/python scripts/bench_binance.py --clock cpu   # on a shared machine
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import msgspec

from pushd.binance.arrays import SOURCES, AllMarket
from pushd.binance.dialect import frames
from pushd.binance.streams import Market, parse
from pushd.bus.model import new_epoch
from pushd.channels import Channel, market_channel, parse_internal
from pushd.gateway.hub import Hub, Outlet, text_frame

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


def ticker_data(symbol: str) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({
        "s": symbol, "open": "65000.1", "high": "65100.2", "low": "64900.3", "last": "65010.4",
        "volume": "1234.567", "quoteVolume": "80234567.1234", "change": "10.3",
        "changePercent": "0.016", "count": 12345, "firstId": 1, "lastId": 12345,
        "openTime": 1_795_000_000_000, "closeTime": 1_795_086_400_000}))  # fmt: skip


def mark_data(symbol: str) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({
        "s": symbol, "markPrice": "65000.12345678", "indexPrice": "64998.1", "premiumIndex": "0",
        "estimatedSettlePrice": "64999.5", "fundingRate": "0.0001",
        "nextFundingTime": 1_795_000_000_000, "T": 1_795_000_000_000}))  # fmt: skip


def every_second(followers: int, symbols: int, name: str, market: Market, arrays: bool,
                 seconds: int, clock: Callable[[], float]) -> float:  # fmt: skip
    """Milliseconds per second of ``symbols`` symbols each changing once, to ``followers``
    followers of the all-market stream ``name`` (``arrays``) or of each symbol's own stream
    of that kind (the views)."""
    names = [f"S{i:03d}USDT" for i in range(symbols)]
    every_name = frozenset(names)
    stream = parse(name, every_name, market)
    source = SOURCES[stream.kind]
    make = mark_data if source == "markPrice" else ticker_data
    data = {s: make(s) for s in names}
    channels = {s: parse_internal(market_channel(source, s), every_name) for s in names}
    hub = Hub()
    every = AllMarket[Outlet](market)
    outlets = [Outlet(1 << 30) for _ in range(followers)]
    for symbol, channel in channels.items():
        if arrays:
            hub.tap(channel, market, functools.partial(
                lambda s, sym, _e, _q, d: every.changed(s, sym, d), source, symbol))  # fmt: skip
            continue
        own = parse(f"{symbol.lower()}@{stream.kind}", every_name, market)
        view: Callable[[], object] = functools.partial(frames, own, market, False, hub)
        for outlet in outlets:
            hub.join_view(outlet, channel, own.name, view)  # type: ignore[arg-type]
    if arrays:
        for outlet in outlets:
            every.follow(stream, False, outlet)
    epoch = new_epoch()
    started = clock()
    for second in range(1, seconds + 1):
        for symbol, channel in channels.items():
            hub.publish(channel.internal, epoch, second, data[symbol])
        if arrays:
            for payload, who in every.due():
                hub.deliver(who, text_frame(payload))
        for outlet in outlets:
            outlet.out.clear()
        hub.take_dirty()
    return (clock() - started) / seconds * 1e3


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
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=20)
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
    print(f"all-market streams: {args.subscribers} followers, {args.symbols} symbols changing "
          f"once a second, {args.seconds} s, median of {args.repeat}")  # fmt: skip
    for name, market in (("!miniTicker@arr", "spot"), ("!ticker@arr", "spot"),
                         ("!markPrice@arr", "futures")):  # fmt: skip
        modes = (("arrays", True, args.subscribers), ("taps", True, 0),
                 ("views", False, args.subscribers))  # fmt: skip
        for mode, arrays, followers in modes:
            runs = [every_second(followers, args.symbols, name, market, arrays,  # type: ignore[arg-type]
                                 args.seconds, clock) for _ in range(args.repeat)]  # fmt: skip
            print(f"  {name:18} {mode:6} {statistics.median(runs):8.2f} ms/second")


if __name__ == "__main__":
    main()
