#!/usr/bin/env python3
"""pushd's benchmark harness: pushd against its peers, same client, same workload, one table.

    .venv/bin/python scripts/bench.py                 # the short version of everything
    .venv/bin/python scripts/bench.py --scenarios broadcast --rates 500 1000 2000 4000

Targets, each started fresh for each run as its own process tree pinned to core 0 (the load
generator and the publisher are pinned to core 1, so server CPU is measured cleanly):

- ``pushd``: ``pushd run``; subscribers send ``{"op":"subscribe",...}``; the publisher uses
  the HTTP batch publish API.
- ``websockets``: the `websockets` library's ``broadcast()`` server (scripts/peers/); the
  publisher sends over a WebSocket.
- ``nchan``: nginx (``nginx-light``) with the nchan module (``libnginx-mod-nchan``), one worker;
  WebSocket subscriber and WebSocket publisher locations. Missing packages are installed with
  apt-get when run as root, else the target is reported missing.
- ``pushd-redis``, ``pushd-redis-2gw`` (not in the default set): pushd on the Redis bus with a
  private ``redis-server`` on the server core: one node of role ``all``, or ``--workers 2`` (two
  gateway processes and a compute process). Rows add Redis's CPU per published message and
  deliveries per CPU-second counting Redis too.
- ``pushd-binance`` (not in the default set): the same ``pushd run`` with its Binance spot
  surface on; the clients connect there and ``SUBSCRIBE`` ``btcusdt@trade``, a view of the
  channel pushd's own broadcast publishes (``trades_BTCUSDT``, by the same HTTP batch
  publish); each message is a batch of one trade (``benchlib_targets.trade_message``: ~130
  bytes, a Binance frame ~150), so one Binance ``trade`` frame per message, as pushd's one
  event frame; clients read the publish time from ``E``.
- ``pushd-engine`` (not in the default set): the same ``pushd run`` published to as a backend
  can, over its authenticated engine link (docs/wire.md, "Publishing from a backend"): one
  TCP connection, a sealed frame of one ``publish`` event per message, to ``notice``, which
  its subscribers follow. Like nchan's and websockets' publishers (one WebSocket frame per
  publish on one connection), unlike ``pushd``'s HTTP request per publish (~0.7 ms of server
  CPU each, BENCHMARKS.md), which is the default target's publisher.

Publishers (``--publisher``, broadcast): ``pipelined`` (the default) sends each publish at
once (pushd: HTTP pipelined, up to 100 in flight; pushd-engine: a frame; the peers: a
WebSocket frame); ``waiting`` waits for each publish's answer before the next (pushd: an HTTP
request at a time; pushd-engine: each frame asks for its ack; nchan: an HTTP ``POST`` to its
publisher location, answered once the message is out; websockets has none). A waiting
publisher shares the client core with the subscribers, so it may not reach the offered rate:
read the ``delivered`` column beside the ratio.

Scenarios:

1. ``broadcast``: N subscribers on one channel, ~100-byte messages at each offered rate; stops
   raising the rate for a target once loss appears or p99 passes ``--p99-limit-ms``.
2. ``market``: pushd, and ``pushd-binance`` if asked: 20 symbols, each client on a few streams
   (through the dialect: ``@depth@100ms``, ``@trade``, ``@ticker``; a trade batch of 3 is
   3 frames there), realistic message sizes, plus ``--stallers`` clients that stop reading:
   the others' p99 with and without them, and their gaps (seqs; through the dialect the
   depth ``U``/``u`` and trade id chains).
3. ``private``: pushd only: logged-in users, each receiving its own order events.
4. ``idle``: as many subscribed connections as fit (default 15,000): server RSS per connection;
   for pushd also with a login first (``+ login``).
5. ``storm``: connections + upgrades + subscriptions per second from 4 clients; for pushd also
   with a login first (``+ login``).

Headline figures: delivered messages/s; **deliveries per server CPU-second** (what one core
buys); publish->receive latency p50/p99/p99.9/max; messages lost; server CPU and RSS.

The harness lives in three modules beside this script: ``benchlib_targets`` (the servers under
test), ``benchlib_scenarios`` (the load and each scenario) and ``benchlib_report`` (the table).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from typing import Any

from bench_client import CLIENT_CPU, pin
from benchlib_report import medians, ratios, table
from benchlib_scenarios import SCENARIOS
from benchlib_targets import DEFAULT_TARGETS, ROOT, SERVER_CPU, TARGETS, Nchan, Pushd, Target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=TARGETS)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--size", type=int, default=100, help="message bytes")
    parser.add_argument("--batch", type=int, default=50, help="messages per publish call")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 50],
        help="broadcast: publish patterns, messages per call (1 = unbatched)",
    )
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the table has medians")
    parser.add_argument("--p99-limit-ms", type=float, default=1000.0, help="stop raising")
    parser.add_argument("--idle", type=int, default=15000, help="idle connections")
    parser.add_argument("--storm-seconds", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=1000, help="private scenario users")
    parser.add_argument("--private-rate", type=float, default=5000.0)
    parser.add_argument("--readers", type=int, default=1000, help="market scenario readers")
    parser.add_argument("--stallers", type=int, default=50, help="market clients that stall")
    parser.add_argument(
        "--publisher",
        choices=["pipelined", "waiting"],
        default="pipelined",
        help="broadcast: send each publish at once, or wait for its answer before the next",
    )
    parser.add_argument(
        "--pushd-limits",
        default="",
        help='[limits] lines for pushd, e.g. "coalesce_ms = 5" (experiments)',
    )
    args = parser.parse_args()
    Pushd.limits = args.pushd_limits.replace(";", "\n") + "\n"
    Target.waiting = args.publisher == "waiting"
    if Target.waiting and "broadcast" in args.scenarios and args.batches != [1]:
        parser.error("--publisher waiting: one message per publish only (--batches 1)")
    if Target.waiting and (cannot := [t for t in args.targets if not TARGETS[t].can_wait]):
        parser.error(f"--publisher waiting: no publisher of {', '.join(cannot)} waits")
    pin(CLIENT_CPU)
    targets = list(args.targets)
    if "nchan" in targets and (why := Nchan.available()) is not None:
        print(f"# nchan missing: {why}")
        targets.remove("nchan")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    print(
        f"# pushd bench {datetime.date.today()} commit {commit} cpus {os.cpu_count()} "
        f"server on cpu {SERVER_CPU}, clients on cpu {CLIENT_CPU}"
    )
    print(f"# {' '.join(sys.argv)}")
    runs: list[dict[str, Any]] = []
    for n in range(args.repeat):
        if args.repeat > 1:
            print(f"# run {n + 1} of {args.repeat}", flush=True)
        for scenario in args.scenarios:
            runs += SCENARIOS[scenario](args, targets)
    rows = medians(runs)
    print()
    print(table(rows))
    print()
    for line in ratios(rows):
        print(line)


if __name__ == "__main__":
    main()
