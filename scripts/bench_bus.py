#!/usr/bin/env python3
"""What the Redis bus costs: Redis CPU per message, the latency of the Redis hop, and what
one and two gateway processes deliver per CPU-second.

    .venv/bin/python scripts/bench_bus.py                 # all three, medians of --repeat runs

1. ``redis``: a private ``redis-server`` (pinned to the server core); the bus's own publish path
   (``RedisBus`` in this process, the real Lua script) sends ``--messages`` messages on one
   channel, one per script call (each waited for) and in runs of 50 per call, with 0, 1 and 2
   nodes subscribed (real pub/sub connections that must get every message). Redis CPU from
   /proc, per message.
2. ``hop``: ``bench.py``'s broadcast with few subscribers and a low rate, so the server is
   idle between messages: the probe's publish->receive p50/p99 for pushd on the memory bus and
   on the Redis bus (one node of role all: HTTP -> compute -> Redis -> the same node's
   gateway). The difference is what the Redis hop adds.
3. ``gateways``: ``bench.py``'s broadcast, 1,000 subscribers, one message per publish call
   and bursts of 50, for pushd on the memory bus, one node on Redis, and ``--workers 2``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench
import trio
from benchlib import free_port, proc_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pushd.bus.model import Outgoing  # noqa: E402
from pushd.bus.redis import RedisBus  # noqa: E402
from pushd.config import BusConfig, RedisBusConfig  # noqa: E402
from pushd.gateway.hub import Hub  # noqa: E402


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", str(bench.SERVER_CPU), "redis-server", "--port", str(port),
         "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"Ready to accept connections" in line:
            break
    return proc, port


class CountingHub(Hub):
    """A node's hub that says when it has received ``expect`` messages."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.expect = expect
        self.all_in = trio.Event()

    def publish(self, internal: str, epoch: str, seq: int, data: Any) -> int:
        delivered = super().publish(internal, epoch, seq, data)
        if self.published >= self.expect:
            self.all_in.set()
        return delivered


async def publish_run(
    redis_pid: int, port: int, messages: int, run: int, nodes: int
) -> dict[str, Any]:
    """``messages`` through the bus in runs of ``run`` with ``nodes`` subscribed nodes."""
    config = BusConfig(kind="redis", redis=RedisBusConfig(url=f"redis://127.0.0.1:{port}"))
    publisher = RedisBus(Hub(), config)
    followers = [CountingHub(messages) for _ in range(nodes)]
    buses = [RedisBus(hub, config) for hub in followers]
    channel = "notice"
    data = Outgoing(channel, bench.message(0, 100))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        for bus in buses:
            await nursery.start(bus.run)
            bus.interest(channel)
            await bus.recover(channel, None)  # subscribed, confirmed
        await publisher.wait_ready()
        cpu0, t0 = proc_cpu_seconds(redis_pid), time.perf_counter()
        sent = 0
        while sent < messages:  # each call's messages leave as one script call
            publisher.publish([data] * run)
            sent += run
            await publisher.drain(30)
        with trio.fail_after(60):
            for hub in followers:  # every subscribed node got every message
                await hub.all_in.wait()
        elapsed = time.perf_counter() - t0
        cpu = proc_cpu_seconds(redis_pid) - cpu0
        nursery.cancel_scope.cancel()
    return {"run": run, "nodes": nodes, "us_per_msg": 1e6 * cpu / messages,
            "msgs_per_s": messages / elapsed}  # fmt: skip


def redis_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for run in (1, 50):
        for nodes in (0, 1, 2):
            results = []
            for _ in range(args.repeat):
                proc, port = start_redis()
                try:
                    results.append(trio.run(publish_run, proc.pid, port, args.messages, run, nodes))
                finally:
                    proc.terminate()
                    proc.wait()
            row = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(f"  redis  run={run:<3} nodes={nodes}  Redis CPU {row['us_per_msg']:.1f} us/msg"
                  f"  {row['msgs_per_s']:,.0f} msgs/s", flush=True)  # fmt: skip
            rows.append(row)
    return rows


def broadcast_rows(args: argparse.Namespace, targets: list[str], subscribers: int,
                   rates: list[float], batch: int) -> list[dict[str, Any]]:  # fmt: skip
    options = argparse.Namespace(
        subscribers=subscribers, rates=rates, size=100, batch=batch, duration=args.duration,
        processes=2, p99_limit_ms=1e9,
    )  # fmt: skip
    runs = []
    for _ in range(args.repeat):
        for name in targets:
            for rate in rates:
                result = bench.fanout_run(bench.TARGETS[name](), subscribers, rate, options, batch)
                bench.print_row(result)
                runs.append(result)
    return bench.medians(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["redis", "hop", "gateways"])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 50],
        help="messages per publish call in the gateways part",
    )
    args = parser.parse_args()
    bench.pin(bench.CLIENT_CPU)
    print(f"# {' '.join(sys.argv)}")
    rows: list[dict[str, Any]] = []
    if "redis" in args.parts:
        redis_cost(args)
    if "hop" in args.parts:
        rows += broadcast_rows(args, ["pushd", "pushd-redis"], 10, [100], 1)
    if "gateways" in args.parts:
        for batch in args.batches:
            rows += broadcast_rows(args, ["pushd", "pushd-redis", "pushd-redis-2gw"], 1000,
                                   [250, 1000], batch)  # fmt: skip
    if rows:
        print()
        print(bench.table(rows))


if __name__ == "__main__":
    main()
