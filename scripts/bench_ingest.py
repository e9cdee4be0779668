#!/usr/bin/env python3
"""Ingest benchmark: engine events per second one pushd process accepts, over UDP and TCP.

    .venv/bin/python scripts/bench_ingest.py --duration 3 --rates 0 50000 100000 200000

Starts ``pushd run`` as its own process; a separate sender process offers trades (``--batch``
per frame) at each offered rate (0 = as fast as the sender can), over UDP and then over TCP.
Every accepted trade goes the whole way through the market computations (trade batch, ticker,
14 kline intervals), as in production. It reports, per run: the offered and accepted events/s
(read from the server's own ``/metrics`` once its counters stop moving), frames lost (UDP: the
kernel dropped datagrams, which pushd sees as sequence gaps), and the server's CPU use.
The UDP receive buffer is ``[ingest] udp_receive_buffer_bytes`` (default 8 MiB), capped by the
kernel's ``net.core.rmem_max``: the script prints both. Frames are sealed (HMAC-SHA256 with the
source's key, as in production); ``--unsealed`` sends them bare to a pushd with
``allow_unauthenticated``, to see what the seal costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time
from pathlib import Path

from benchlib import free_port, metrics, proc_cpu_seconds, pushd_server

from ingest import wire
from ingest.framing import Framer

TRADES = "pushd_ingest_events_total", (("type", "Trade"),)
LOST = "pushd_ingest_lost_frames_total", ()
KEY = "bench-ingest-key-" + "k" * 32


def sender(transport: str, port: int, batch: int, rate: float, duration: float, src: int,
           sealed: bool, out: mp.Queue) -> None:  # type: ignore[type-arg]  # fmt: skip
    framer = Framer(src=src, key=KEY.encode() if sealed else None)
    ts = int(time.time() * 1000)
    events = [wire.Trade("BTCUSDT", i, "65000.1", "0.010", "buy", ts) for i in range(batch)]
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))

        def send() -> None:
            sock.send(framer.frame(events))
    else:
        sock = socket.create_connection(("127.0.0.1", port))

        def send() -> None:
            sock.sendall(framer.tcp_frame(events))

    interval = batch / rate if rate else 0.0
    frames = 0
    start = time.perf_counter()
    next_at = start
    while (now := time.perf_counter()) - start < duration:
        send()
        frames += 1
        if interval:
            next_at += interval
            if next_at > now:
                time.sleep(next_at - now)
    elapsed = time.perf_counter() - start
    sock.close()
    out.put((frames, elapsed))


def settle(http_port: int) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], float]:
    """Metrics once the trade counter has stopped moving, and when it last moved."""
    last, moved_at = metrics(http_port), time.perf_counter()
    while True:
        time.sleep(0.2)
        now = metrics(http_port)
        if now.get(TRADES, 0) == last.get(TRADES, 0):
            return now, moved_at
        last, moved_at = now, time.perf_counter()


def run(transport: str, rate: float, args: argparse.Namespace, src: int) -> dict[str, float]:
    http_port, udp_port, tcp_port = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    config = (
        f"[websocket]\nport = {free_port()}\n[http]\nport = {http_port}\n"
        f"[engine]\nsnapshot_enabled = false\n[auth.hmac]\nsecret = 'bench'\n"
        f"[ingest]\nudp_port = {udp_port}\ntcp_port = {tcp_port}\n"
        + ("allow_unauthenticated = true\n" if args.unsealed else
           f"sources = [{{id = {src}, key = '{KEY}', silent_after_s = 0}}]\n")
    )  # fmt: skip
    with pushd_server(config, http_port) as server:
        before = metrics(http_port)
        cpu0 = proc_cpu_seconds(server.pid)
        out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        port = udp_port if transport == "udp" else tcp_port
        proc = mp.Process(
            target=sender,
            args=(transport, port, args.batch, rate, args.duration, src, not args.unsealed, out),
        )
        start = time.perf_counter()
        proc.start()
        frames, elapsed = out.get(timeout=args.duration + 60)
        proc.join()
        after, done_at = settle(http_port)
        cpu = proc_cpu_seconds(server.pid) - cpu0
    accepted = after.get(TRADES, 0) - before.get(TRADES, 0)
    busy = max(elapsed, done_at - start)
    return {
        "offered_ev_s": frames * args.batch / elapsed,
        "accepted_ev_s": accepted / busy,
        "lost_pct": 100 * (after.get(LOST, 0) - before.get(LOST, 0)) / max(frames, 1),
        "server_cpu_pct": 100 * cpu / busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20, help="trades per frame")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0], help="events/s, 0 = max")
    parser.add_argument("--transports", nargs="+", default=["udp", "tcp"])
    parser.add_argument("--unsealed", action="store_true", help="bare frames (no HMAC)")
    args = parser.parse_args()
    rmem_max = Path("/proc/sys/net/core/rmem_max").read_text().strip()
    print(f"# ingest: {vars(args)}  net.core.rmem_max={rmem_max}")
    src = 1
    for transport in args.transports:
        for rate in args.rates:
            result = run(transport, rate, args, src)
            src += 1
            shown = "max" if not rate else f"{rate:,.0f}"
            print(f"{transport} rate={shown:>8}  " + "  ".join(
                f"{k}={v:,.1f}" for k, v in result.items()))  # fmt: skip


if __name__ == "__main__":
    main()
