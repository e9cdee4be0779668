#!/usr/bin/env python3
"""Fan-out benchmark: N subscribers on one channel, fixed-size messages, one pushd process.

    .venv/bin/python scripts/bench_fanout.py --subscribers 1000 --duration 5

Starts ``pushd run`` as its own process, opens the subscribers from ``--clients`` separate
processes (each on its own 127.0.0.x source address), publishes batches through the HTTP publish
API as fast as the server takes them (or at ``--rate`` msgs/s), and prints delivered messages/s,
publish->receive latency percentiles (timestamp in the payload, sampled from the last frame of
every receive), the server's CPU seconds and RSS.

The client counts frames by walking WebSocket frame headers and decodes nothing else, so that
it is not the bottleneck; its CPU use is printed so one can check.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import selectors
import socket
import statistics
import time

import httpx
import msgspec
from benchlib import free_port, proc_cpu_seconds, proc_rss_kib, pushd_server
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

CHANNEL = "trades_BTCUSDT"
PROTOCOL_CHANNEL = "BTCUSDT@trades"
TOKEN = "bench-token"


def open_subscriber(port: int, src: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), source_address=(src, 0))
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/ws")))
    accepted = False
    while not accepted:
        ws.receive_data(sock.recv(65536))
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    sock.sendall(ws.send(TextMessage(data=f'{{"op":"subscribe","channel":"{PROTOCOL_CHANNEL}"}}')))
    reply = b""
    while not reply.endswith(b"}"):
        reply += sock.recv(65536)
    sock.setblocking(False)
    return sock


def client_main(port: int, count: int, src: str, window: mp.Array, out: mp.Queue) -> None:  # type: ignore[type-arg]
    socks = [open_subscriber(port, src) for _ in range(count)]
    sel = selectors.DefaultSelector()
    rest: dict[int, bytes] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        rest[s.fileno()] = b""
    out.put(("ready", count))
    frames = 0
    latencies: list[int] = []
    cpu0 = time.process_time()
    while True:
        start_ns, end_ns = window[0], window[1]
        now = time.time_ns()
        if end_ns and now > end_ns:
            break
        counting = start_ns and now >= start_ns
        for key, _ in sel.select(0.05):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            fd = sock.fileno()
            buf = rest[fd] + data if rest[fd] else data
            i, n, last = 0, len(buf), -1
            while i + 2 <= n:
                length = buf[i + 1] & 0x7F
                head = 2
                if length == 126:
                    if i + 4 > n:
                        break
                    length = int.from_bytes(buf[i + 2 : i + 4], "big")
                    head = 4
                if i + head + length > n:
                    break
                last = i + head
                i += head + length
                frames += counting
            rest[fd] = buf[i:]
            if counting and last >= 0:
                t_at = buf.find(b'"t":', last)
                if t_at >= 0:
                    latencies.append(time.time_ns() - int(buf[t_at + 4 : t_at + 23]))
    out.put(("done", frames, latencies, time.process_time() - cpu0))
    for s in socks:
        s.close()


def publisher(http_port: int, batch: int, size: int, rate: float, until_ns: int) -> int:
    pad = "x" * max(0, size - 70)
    sent = 0
    interval = batch / rate if rate else 0.0
    next_at = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}",
                      headers={"authorization": f"Bearer {TOKEN}"}) as client:  # fmt: skip
        while time.time_ns() < until_ns:
            t = time.time_ns()
            body = msgspec.json.encode(
                {"messages": [{"channel": CHANNEL, "data": {"t": t, "pad": pad}}] * batch}
            )
            r = client.post("/v1/publish/batch", content=body)
            r.raise_for_status()
            sent += batch
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
    return sent


def run(args: argparse.Namespace) -> dict[str, float]:
    ws_port, http_port = free_port(), free_port()
    config = (
        f"[websocket]\nport = {ws_port}\nmax_connections = {args.subscribers + 100}\n"
        f"[http]\nport = {http_port}\npublish_token = '{TOKEN}'\nmax_batch = 10000\n"
        f"[limits]\noutbound_buffer_bytes = {args.buffer}\n"
        f"[engine]\nsnapshot_enabled = false\n"
        f"[ingest]\nudp_enabled = false\ntcp_enabled = false\n"
    )
    with pushd_server(config, http_port) as server:
        window = mp.Array("q", [0, 0], lock=False)
        out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        per = args.subscribers // args.clients
        procs = [
            mp.Process(target=client_main, args=(ws_port, per, f"127.0.0.{2 + i}", window, out))
            for i in range(args.clients)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            assert out.get(timeout=60)[0] == "ready"
        warmup_ns = int(args.warmup * 1e9)
        now = time.time_ns()
        window[0] = now + warmup_ns
        window[1] = now + warmup_ns + int(args.duration * 1e9)
        cpu0 = None
        t_cpu_start = window[0]
        sent = 0
        # warm up, then measure the server's CPU over the window
        sent += publisher(http_port, args.batch, args.size, args.rate, t_cpu_start)
        cpu0 = proc_cpu_seconds(server.pid)
        sent += publisher(http_port, args.batch, args.size, args.rate, window[1])
        cpu1 = proc_cpu_seconds(server.pid)
        rss = proc_rss_kib(server.pid)
        frames, lat, client_cpu = 0, [], 0.0
        for _ in procs:
            _, f_count, f_lat, f_cpu = out.get(timeout=60)
            frames += f_count
            lat += f_lat
            client_cpu += f_cpu
        for p in procs:
            p.join()
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else float("nan")

    return {
        "delivered_per_s": frames / args.duration,
        "published": sent,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": lat[-1] / 1e6 if lat else float("nan"),
        "server_cpu_s": cpu1 - cpu0,
        "server_rss_mib": rss / 1024,
        "client_cpu_s": client_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--size", type=int, default=100, help="approximate frame bytes")
    parser.add_argument("--batch", type=int, default=200, help="messages per publish request")
    parser.add_argument("--rate", type=float, default=0.0, help="msgs/s to publish; 0 = max")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--buffer", type=int, default=262144, help="outbound_buffer_bytes")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    print(f"# fan-out: {vars(args)}")
    results = [run(args) for _ in range(args.repeat)]
    for r in results:
        print("  ".join(f"{k}={v:,.1f}" for k, v in r.items()))
    if len(results) > 1:
        med = statistics.median(r["delivered_per_s"] for r in results)
        print(f"median delivered_per_s={med:,.0f}")


if __name__ == "__main__":
    main()
