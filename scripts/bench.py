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

Scenarios:

1. ``broadcast``: N subscribers on one channel, ~100-byte messages at each offered rate; stops
   raising the rate for a target once loss appears or p99 passes ``--p99-limit-ms``.
2. ``market``: pushd only: 20 symbols, each client on a few streams, realistic message sizes,
   plus one client that stops reading: the others' p99 with and without it, and their gaps.
3. ``private``: pushd only: logged-in users, each receiving its own order events.
4. ``idle``: as many subscribed connections as fit (default 15,000): server RSS per connection.
5. ``storm``: connections + upgrades + subscriptions per second from 4 clients.

Headline figures: delivered messages/s; **deliveries per server CPU-second** (what one core
buys); publish->receive latency p50/p99/p99.9/max; messages lost; server CPU and RSS.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from bench_client import (
    CLIENT_CPU,
    TLS_CA,
    idle_main,
    pin,
    probe_main,
    storm_main,
    subscriber_main,
)
from benchlib import free_port, proc_cpu_seconds, proc_rss_kib, wait_ready
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
PUBLISH_TOKEN = "bench-token"
SECRET = "bench-secret"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


# -- targets --------------------------------------------------------------------------------


class Target:
    """A server under test: how to start it, subscribe to it, publish to it."""

    name = ""
    path = "/"
    setup: list[bytes] = []  # frames each subscriber sends after the upgrade (pushd: subscribe)

    def __init__(self) -> None:
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))

    def start(self, connections: int) -> None:
        raise NotImplementedError

    def publisher(self) -> Callable[[list[bytes]], None]:
        """A function that publishes a batch of JSON messages on the benchmark channel."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs] + self._children()

    def _children(self) -> list[int]:
        """Child processes of every thread (trio starts processes from a worker thread)."""
        out = []
        for proc in self.procs:
            for path in Path(f"/proc/{proc.pid}/task").glob("*/children"):
                out += [int(pid) for pid in path.read_text().split()]
        return out

    def cpu(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def rss_kib(self) -> int:
        return sum(proc_rss_kib(pid) for pid in self.pids())

    def stop(self) -> None:
        log = self.tmp / "stderr.log"
        if log.exists() and b'"level":"error"' in log.read_bytes():  # a server fault: show it
            print(log.read_text()[-3000:], file=sys.stderr)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        taskset = ["taskset", "-c", str(SERVER_CPU)] if shutil.which("taskset") else []
        proc = subprocess.Popen([*taskset, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def _wait_port(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")


class HttpPipeline:
    """pushd's publisher: each call is one POST that goes out at once, without waiting for the
    answer to the one before (HTTP/1.1 pipelining on one keep-alive connection; a thread reads
    the answers). That is how the peers' publishers behave (a WebSocket frame per publish, no
    answer awaited), so every target gets the same offered load; a server that falls behind
    fills the socket, or has WINDOW answers outstanding, and the publisher waits."""

    WINDOW = 100  # publishes in flight at most: a server far behind holds the publisher
    PER_CONNECTION = 1000  # hypercorn's keep_alive_max_requests: then a new connection

    def __init__(self, port: int) -> None:
        self.port = port
        self._room = threading.Semaphore(self.WINDOW)
        self.socks: list[socket.socket] = []
        self._on_sock = self.PER_CONNECTION
        self.head = (
            b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer "
            + PUBLISH_TOKEN.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        )
        self.sent = self.answered = self.refused = 0

    def post(self, path: bytes, body: bytes) -> None:
        self._room.acquire()
        if self._on_sock == self.PER_CONNECTION:
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)
            threading.Thread(target=self._read, args=(sock,), daemon=True).start()
            self._on_sock = 0
        self.socks[-1].sendall(self.head % (path, len(body)) + body)
        self._on_sock += 1
        self.sent += 1

    def _read(self, sock: socket.socket) -> None:
        rest = b""
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            rest += data
            answers = rest.count(b"HTTP/1.1 ")
            self.answered += answers
            for _ in range(answers):
                self._room.release()
            self.refused += rest.count(b"HTTP/1.1 ") - rest.count(b"HTTP/1.1 200")
            rest = rest[rest.rfind(b"HTTP/1.1 ") + 1 :] if b"HTTP/1.1 " in rest else rest[-16:]

    def close(self) -> None:
        if self.refused:
            print(f"# {self.refused} of {self.answered} publishes refused", file=sys.stderr)
        for sock in self.socks:
            sock.close()


class Pushd(Target):
    name = "pushd"
    limits = ""  # [limits] lines for every pushd target of the run (--pushd-limits)
    path = "/ws"
    setup = [b'{"op":"subscribe","channel":"BTCUSDT@trades"}']
    channel = "trades_BTCUSDT"

    def __init__(self, symbols: int = 3) -> None:
        super().__init__()
        self.http_port = free_port()
        self.extra_limits = Pushd.limits  # more [limits] lines for one scenario
        self.extra_config = ""  # more sections ([bus] ...)
        self.run_args: list[str] = []  # more `pushd run` options (--workers N)
        self.symbols = [f"S{i:02d}USDT" for i in range(symbols - 1)] + ["BTCUSDT"]
        self.pipelines: list[HttpPipeline] = []

    def start(self, connections: int) -> None:
        markets = "".join(f"[markets.{s}]\n" for s in self.symbols)
        config = self.tmp / "pushd.toml"
        config.write_text(
            f"[websocket]\nport = {self.port}\nmax_connections = {connections + 500}\n"
            f"max_connections_per_ip = {connections + 500}\nhandshakes_per_second = 1e6\n"
            f"[http]\nport = {self.http_port}\npublish_token = '{PUBLISH_TOKEN}'\n"
            f"max_batch = 10000\nallow_market_publish = true\n[auth.hmac]\nsecret = '{SECRET}'\n"
            f"[limits]\nmax_subscriptions = 200\n{self.extra_limits}"
            f"[engine]\nsnapshot_enabled = false\n"
            f"[ingest]\nudp_enabled = false\ntcp_enabled = false\n"
            f"[log]\nlevel = 'warning'\nformat = 'json'\n{markets}{self.extra_config}"
        )
        self._spawn(
            [sys.executable, "-m", "pushd", "run", "--config", str(config), *self.run_args],
            stderr=open(self.tmp / "stderr.log", "wb"),  # noqa: SIM115 (kept for the run)
        )
        wait_ready(self.http_port)

    def publisher(self, channels: list[str] | None = None) -> Callable[[list[bytes]], None]:
        names = [name.encode() for name in channels or [self.channel]]
        turn = itertools.count()  # channels in turn across calls: every one gets its share
        pipeline = HttpPipeline(self.http_port)
        self.pipelines.append(pipeline)

        def publish(batch: list[bytes]) -> None:
            items = b",".join(
                b'{"channel":"%s","data":%s}' % (names[next(turn) % len(names)], message)
                for message in batch
            )
            pipeline.post(b"/v1/publish/batch", b'{"messages":[' + items + b"]}")

        return publish

    def stop(self) -> None:
        for pipeline in self.pipelines:
            pipeline.close()
        super().stop()


class PushdRedis(Pushd):
    """pushd on the Redis bus, with a private ``redis-server`` on the server core: one node of
    role ``all``, or (``workers``) the supervisor's N gateway workers and compute process.
    ``cpu()`` is pushd's processes; ``redis_cpu()`` is Redis's, reported beside it."""

    name = "pushd-redis"
    workers = 0

    def start(self, connections: int) -> None:
        self.redis_port = free_port()
        self.redis = self._spawn(
            ["redis-server", "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs.remove(self.redis)  # counted apart
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", self.redis_port)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.extra_config = (
            f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = 'redis://127.0.0.1:{self.redis_port}'\n"
        )
        if self.workers:
            self.run_args = ["--workers", str(self.workers)]
        super().start(connections)
        if self.workers:  # the compute process answers first: wait for the gateways too
            self._wait_port()

    def redis_cpu(self) -> float:
        return proc_cpu_seconds(self.redis.pid)

    def stop(self) -> None:
        super().stop()
        self.redis.terminate()
        self.redis.wait(10)


class PushdRedis2(PushdRedis):
    name = "pushd-redis-2gw"
    workers = 2


class WsPublisher:
    """Publishes by sending WebSocket text frames to a peer's publish location."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=path)))
        accepted = False
        while not accepted:
            self.ws.receive_data(self.sock.recv(65536))
            accepted = any(isinstance(e, AcceptConnection) for e in self.ws.events())

    def __call__(self, batch: list[bytes]) -> None:
        self.sock.sendall(b"".join(self.ws.send(TextMessage(m.decode())) for m in batch))


class Websockets(Target):
    name = "websockets"
    path = "/sub"

    def start(self, connections: int) -> None:
        script = ROOT / "scripts" / "peers" / "ws_broadcast.py"
        self._spawn([sys.executable, str(script), str(self.port)], stdout=subprocess.DEVNULL)
        self._wait_port()

    def publisher(self) -> Callable[[list[bytes]], None]:
        return WsPublisher(self.port, "/pub")


class Nchan(Target):
    name = "nchan"
    path = "/sub"

    @staticmethod
    def available() -> str | None:
        """None if nginx and nchan are there (installing them if root may), else why not."""
        missing = shutil.which("nginx") is None or not NCHAN_MODULE.exists()
        if missing and os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-nchan"],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
            return "nginx-light and libnginx-mod-nchan are not installed (apt-get install them)"
        return None

    def start(self, connections: int) -> None:
        conf = self.tmp / "nginx.conf"
        tmp = self.tmp
        conf.write_text(f"""
load_module {NCHAN_MODULE};
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 19500; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  nchan_shared_memory_size 256m;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /sub {{ nchan_subscriber websocket; nchan_channel_id bench; }}
    location = /pub {{ nchan_publisher websocket; nchan_channel_id bench;
                       nchan_message_buffer_length 16; nchan_message_timeout 30s; }}
  }}
}}
""")
        self._spawn(["nginx", "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL)
        self._wait_port()

    def publisher(self) -> Callable[[list[bytes]], None]:
        return WsPublisher(self.port, "/pub")


class ConnectFloor(Target):
    """The storm's floor (scripts/peers/connect_floor.py): what Python pays per connect +
    upgrade + subscribe before any server logic; storm only (it cannot publish)."""

    kind = ""
    setup = [b'{"op":"subscribe","args":["floor"],"id":1}']

    def start(self, connections: int) -> None:
        script = ROOT / "scripts" / "peers" / "connect_floor.py"
        self._spawn([sys.executable, str(script), self.kind, str(self.port)])
        self._wait_port()


class TrioFloor(ConnectFloor):
    name = "trio-floor"
    kind = "trio"


class EpollFloor(ConnectFloor):
    name = "epoll-floor"
    kind = "epoll"


class PushdTls(Pushd):
    """pushd serving wss:// itself (a trustme certificate): the clients speak TLS too, so the
    client core passes its limit sooner; compare per server CPU-second with ``pushd``."""

    name = "pushd-tls"

    def start(self, connections: int) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.tmp / "server.pem"))
        ca.cert_pem.write_to_path(str(self.tmp / "ca.pem"))
        pem = self.tmp / "server.pem"
        self.extra_config += f"[websocket.tls]\ncertificate = '{pem}'\nkey = '{pem}'\n"
        os.environ[TLS_CA] = str(self.tmp / "ca.pem")  # inherited by the client processes
        super().start(connections)

    def stop(self) -> None:
        os.environ.pop(TLS_CA, None)
        super().stop()


TARGETS: dict[str, type[Target]] = {
    "pushd": Pushd,
    "pushd-tls": PushdTls,
    "websockets": Websockets,
    "nchan": Nchan,
    "trio-floor": TrioFloor,
    "epoll-floor": EpollFloor,
    "pushd-redis": PushdRedis,
    "pushd-redis-2gw": PushdRedis2,
}
DEFAULT_TARGETS = ["pushd", "websockets", "nchan"]


@contextmanager
def running(target: Target, connections: int) -> Iterator[Target]:
    target.start(connections)
    try:
        yield target
    finally:
        target.stop()


# -- load ------------------------------------------------------------------------------------


def message(n: int, size: int) -> bytes:
    body = b'{"t":%d,"n":%d,"pad":"' % (time.time_ns(), n)
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def spawn(main: Callable[..., None], arguments: list[tuple[Any, ...]]) -> list[mp.Process]:
    """Start one load-generator process per entry of ``arguments``."""
    procs = [mp.Process(target=main, args=args) for args in arguments]
    for p in procs:
        p.start()
    return procs


class Probe:
    """The real-time-priority latency probe: one more subscriber, every frame timestamped."""

    def __init__(self, target: Target, setup: list[bytes]) -> None:
        self.control = mp.Array("q", [0, 0], lock=False)
        self.out: mp.Queue[Any] = mp.Queue()
        self.proc = mp.Process(
            target=probe_main, args=(target.port, target.path, setup, self.control, self.out)
        )
        self.proc.start()
        self.realtime = self.out.get(timeout=60)[1]

    def collect(self) -> list[int]:
        self.control[1] = 1
        latencies: list[int] = self.out.get(timeout=60)[1]
        self.proc.join()
        return sorted(latencies)


class Subscribers:
    """Client processes holding subscribers; ``collect`` returns what they saw."""

    def __init__(self, target: Target, processes: int, setups: list[list[bytes]]) -> None:
        """One subscriber per ``setups`` entry (its login and subscribe frames)."""
        self.control = mp.Array("q", [0, 0], lock=False)
        self.out: mp.Queue[Any] = mp.Queue()
        self.procs = spawn(
            subscriber_main,
            [
                (
                    target.port,
                    target.path,
                    setups[i::processes],
                    f"127.0.0.{10 + i}",
                    self.control,
                    self.out,
                )
                for i in range(processes)
            ],
        )
        for _ in self.procs:
            assert self.out.get(timeout=120)[0] == "ready"

    def collect(self, expected_each: int) -> dict[str, Any]:
        self.control[0] = expected_each
        frames, short, lat, cpu = 0, 0, [], 0.0
        for _ in self.procs:
            _, f, s, latencies, c = self.out.get(timeout=120)
            frames, short, cpu = frames + f, short + s, cpu + c
            lat += latencies
        for p in self.procs:
            p.join()
        lat.sort()
        return {"frames": frames, "lost": short, "latencies": lat, "client_cpu": cpu}


def publish_for(
    publish: Callable[[list[bytes]], None],
    rate: float,
    seconds: float,
    batch: int,
    size: int,
    make: Callable[[int, int], bytes] = message,
) -> int:
    """Publish at ``rate`` messages/s for ``seconds`` in batches; returns how many."""
    sent, interval = 0, batch / rate
    start = next_at = time.perf_counter()
    while time.perf_counter() - start < seconds:
        publish([make(sent + i, size) for i in range(batch)])
        sent += batch
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return sent


def pct(lat: list[int], q: float) -> float:
    return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else float("nan")


def row(scenario: str, target: str, params: str, **values: Any) -> dict[str, Any]:
    return {"scenario": scenario, "target": target, "params": params, **values}


def pattern(batch: int) -> str:
    """How the publisher calls: one message per call, or bursts (one HTTP batch for pushd;
    that many WebSocket publish frames in one write for the peers, each its own publish)."""
    return "1/call" if batch == 1 else f"burst {batch}"


def fanout_run(
    target: Target,
    subscribers: int,
    rate: float,
    args: argparse.Namespace,
    burst: int,
) -> dict[str, Any]:
    """N subscribers on one channel; ``rate`` messages/s for ``args.duration`` seconds.

    Server CPU and delivery time run from the first publish until every client has its last
    frame (or gave up after 2 s of silence), so queues drained late are counted too.
    """
    batch = max(1, min(burst, int(rate // 50) or 1))
    with running(target, subscribers):
        subs = Subscribers(target, args.processes, [target.setup] * subscribers)
        probe = Probe(target, target.setup)
        publish = target.publisher()
        redis_cpu = getattr(target, "redis_cpu", lambda: 0.0)
        cpu0, redis0, t0 = target.cpu(), redis_cpu(), time.perf_counter()
        sent = publish_for(publish, rate, args.duration, batch, args.size)
        seen = subs.collect(expected_each=sent)
        elapsed = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
        redis = redis_cpu() - redis0
        rss = target.rss_kib()
        lat = probe.collect()
    load_lat = seen["latencies"]
    return row(
        "broadcast",
        target.name,
        f"N={subscribers} {pattern(batch)} rate={rate:g}/s size={args.size}",
        offered=sent * subscribers / args.duration,
        delivered=seen["frames"] / elapsed,
        per_cpu_s=seen["frames"] / cpu if cpu else float("nan"),
        p50=pct(lat, 0.5),
        p99=pct(lat, 0.99),
        p999=pct(lat, 0.999),
        max=lat[-1] / 1e6 if lat else float("nan"),
        load_p99=pct(load_lat, 0.99),
        lost=seen["lost"],
        cpu_pct=100 * cpu / elapsed,
        rss_mib=rss / 1024,
        client_cpu_pct=100 * seen["client_cpu"] / elapsed,
        client_limit=client_limit(seen["client_cpu"] / elapsed),
        **({"redis_us_msg": 1e6 * redis / sent,
            "per_cpu_s_with_redis": seen["frames"] / (cpu + redis)} if redis else {}),
    )  # fmt: skip


def client_limit(busy: float) -> str:
    """ "yes" when the client core was past ~80 %: the load generator, not the server, may
    have been the limit (the subscriber processes share one core)."""
    return "yes" if busy > 0.8 else "no"


def broadcast(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for burst in args.batches:
        for name in targets:
            for rate in args.rates:
                result = fanout_run(TARGETS[name](), args.subscribers, rate, args, burst)
                rows.append(result)
                print_row(result)
                if result["lost"] or result["p99"] > args.p99_limit_ms:
                    break  # this target broke at this rate
    return rows


def idle(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in targets:
        target = TARGETS[name]()
        with running(target, args.idle):
            time.sleep(0.5)  # let the server settle before the baseline
            rss0 = target.rss_kib()
            control = mp.Array("q", [0, 0], lock=False)
            out: mp.Queue[Any] = mp.Queue()
            counts = split(args.idle, 4)
            t0 = time.perf_counter()
            procs = spawn(
                idle_main,
                [
                    (
                        target.port,
                        target.path,
                        target.setup,
                        counts[i],
                        f"127.0.0.{20 + i}",
                        control,
                        out,
                    )
                    for i in range(4)
                ],
            )
            opened = sum(out.get(timeout=300)[1] for _ in procs)
            took = time.perf_counter() - t0
            rss1 = target.rss_kib()
            flush = flush_rounds(target) if isinstance(target, Pushd) else {}
            control[1] = 1
            for _ in procs:
                out.get(timeout=60)
            for p in procs:
                p.join()
        result = row(
            "idle",
            name,
            f"N={opened} subscribed",
            per_conn_kib=(rss1 - rss0) / opened,
            rss_mib=rss1 / 1024,
            open_s=took,
            **flush,
        )
        rows.append(result)
        print_row(result)
    return rows


def kernel_tcp_kib() -> int:
    """The kernel's TCP buffer memory, all sockets (``/proc/net/sockstat``, pages of 4 KiB)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4
    return 0


def stalled(args: argparse.Namespace, _targets: list[str]) -> list[dict[str, Any]]:
    """pushd only: ``--stallers`` clients subscribe and never read while 2 MB each are offered:
    what one non-reading client costs the server (RSS) and the kernel (TCP buffer memory, both
    ends), with the default 64 KiB send buffer and with the kernel's autotuning (0)."""
    from bench_client import staller_main

    rows = []
    for sndbuf in (65536, 0):
        target = Pushd()
        target.extra_limits = (  # keep them (the worst case) and choose the send buffer
            f"stall_timeout_s = 600.0\nsocket_send_buffer_bytes = {sndbuf}\n"
        )
        with running(target, args.stallers):
            time.sleep(0.5)
            rss0, tcp0 = target.rss_kib(), kernel_tcp_kib()
            control = mp.Array("q", [0, 0], lock=False)
            out: mp.Queue[Any] = mp.Queue()
            setups = [target.setup] * args.stallers
            procs = spawn(
                staller_main, [(target.port, target.path, setups, "127.0.0.46", control, out)]
            )
            for _ in procs:
                assert out.get(timeout=300)[0] == "ready"
            rss1, tcp1 = target.rss_kib(), kernel_tcp_kib()
            publish = target.publisher()
            for n in range(40):  # 40 x 50 x 1 kB = 2 MB offered to each client
                publish([message(n * 50 + i, 1000) for i in range(50)])
            time.sleep(1.0)
            rss2, tcp2 = target.rss_kib(), kernel_tcp_kib()
            control[1] = 1
            for _ in procs:
                out.get(timeout=60)
            for p in procs:
                p.join()
        n = args.stallers
        result = row(
            "stalled", "pushd", f"N={n} never read, 2 MB offered, SO_SNDBUF={sndbuf or 'auto'}",
            server_kib_per_conn=(rss2 - rss1) / n, kernel_kib_per_conn=(tcp2 - tcp1) / n,
            rss_mib=rss2 / 1024, idle_kib_per_conn=((rss1 - rss0) + (tcp1 - tcp0)) / n,
        )  # fmt: skip
        rows.append(result)
        print_row(result)
    return rows


def flush_rounds(target: Pushd, rounds: int = 20) -> dict[str, float]:
    """One message at a time to every idle subscriber: how long one flush round writes in
    all (what an unbroken round would block the loop for) and the longest the flusher ran
    without yielding (the loop stall the gateway actually causes)."""
    publish = target.publisher()
    for n in range(rounds):
        publish([message(n, 100)])
        time.sleep(0.2)  # let the round finish before the next one: rounds, not bursts
    stats = httpx.get(
        f"http://127.0.0.1:{target.http_port}/v1/stats",
        headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
    ).json()
    return {"flush_round_ms": stats["flush_round_max_ms"],
            "loop_stall_ms": stats["flush_stall_max_ms"]}  # fmt: skip


def storm(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    """Connect + upgrade + subscribe as fast as 4 clients can; for pushd also with a login
    (an HMAC ``auth`` before the subscribe), which the peers do not have."""
    runs: list[tuple[str, str, list[bytes] | None]] = [(name, "", None) for name in targets]
    if "pushd" in targets:
        login = b'{"op":"auth","token":"%s"}' % token("1001").encode()
        runs.append(("pushd", " + login", [login, *Pushd.setup]))
    rows = []
    for name, label, setup in runs:
        target = TARGETS[name]()
        with running(target, 4 * 4000):
            out: mp.Queue[Any] = mp.Queue()
            cpu0 = target.cpu()
            procs = spawn(
                storm_main,
                [
                    (
                        target.port,
                        target.path,
                        setup if setup is not None else target.setup,
                        args.storm_seconds,
                        f"127.0.0.{30 + i}",
                        out,
                    )
                    for i in range(4)
                ],
            )
            opened = sum(out.get(timeout=120)[1] for _ in procs)
            cpu = target.cpu() - cpu0
            for p in procs:
                p.join()
        result = row(
            "storm",
            name,
            f"4 clients x {args.storm_seconds:g} s{label}",
            conns_per_s=opened / args.storm_seconds,
            per_cpu_s=opened / cpu if cpu else 0.0,
        )
        rows.append(result)
        print_row(result)
    return rows


# -- pushd-only scenarios (the peers have no login and no per-user channels) -----------------


def token(uid: str) -> str:
    from pushd.auth import issue_hmac_token

    return issue_hmac_token(SECRET, uid, 3600)


def private(args: argparse.Namespace, _targets: list[str]) -> list[dict[str, Any]]:
    """Each connection logged in as its own user and subscribed to its own @order."""
    users = args.users
    target = Pushd()
    with running(target, users):
        setups = [
            [
                b'{"op":"auth","token":"%s"}' % token(str(1000 + i)).encode(),
                b'{"op":"subscribe","channel":"@order"}',
            ]
            for i in range(users)
        ]
        subs = Subscribers(target, args.processes, setups)
        channels = [f"user_{1000 + i}_order" for i in range(users)]
        publish = target.publisher(channels)
        rate = args.private_rate
        cpu0, t0 = target.cpu(), time.perf_counter()
        sent = publish_for(publish, rate, args.duration, args.batch, args.size)
        seen = subs.collect(expected_each=sent // users)
        elapsed = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
    lat = seen["latencies"]
    result = row(
        "private",
        "pushd",
        f"users={users} rate={rate:g}/s",
        delivered=seen["frames"] / elapsed,
        per_cpu_s=seen["frames"] / cpu if cpu else 0.0,
        p50=pct(lat, 0.5),
        p99=pct(lat, 0.99),
        p999=pct(lat, 0.999),
        max=lat[-1] / 1e6 if lat else float("nan"),
        lost=seen["lost"],
    )
    print_row(result)
    return [result]


def market_message(kind: str) -> Callable[[int, int], bytes]:
    """Realistic payloads: a 20-level depth diff, a trade batch of 3, a ticker."""
    levels = ",".join(f'["65{i:03d}.1","0.{i:03d}"]' for i in range(10))
    trades = ",".join(
        f'{{"id":{i},"price":"65001.5","qty":"0.012","side":"buy","ts":1}}' for i in range(3)
    )
    bodies = {
        "depth": f'"e":"depthUpdate","U":1,"u":2,"pu":0,"bids":[{levels}],"asks":[{levels}],'
        '"checksum":1',
        "trades": f'"trades":[{trades}]',
        "ticker": '"open":"64000.1","high":"66000","low":"63900.5","last":"65001.5",'
        '"volume":"12345.678","quoteVolume":"802341234.5","change":"1001.4",'
        '"changePercent":"1.565","count":123456',
    }
    body = bodies[kind]
    return lambda n, _size: f'{{"t":{time.time_ns()},"n":{n},{body}}}'.encode()


def market_setup(names: list[str], i: int) -> list[bytes]:
    """Reader ``i``: depth and trades of one symbol, the ticker of another."""
    a, b = names[i % len(names)], names[(i + 7) % len(names)]
    channels = f'["{a}@depth","{a}@trades","{b}@ticker"]'
    return [f'{{"op":"subscribe","channel":{channels}}}'.encode()]


def market(args: argparse.Namespace, _targets: list[str]) -> list[dict[str, Any]]:
    """20 symbols; each reader on depth + trades of one symbol and the ticker of another; the
    same run again with ``--stallers`` clients that stop reading: the readers' p99 and gaps."""
    from bench_client import reader_main, staller_main

    symbols = 20
    rows = []
    for stallers in (0, args.stallers):
        target = Pushd(symbols)
        names = target.symbols

        with running(target, args.readers + stallers):
            control = mp.Array("q", [0, 0], lock=False)
            out: mp.Queue[Any] = mp.Queue()
            procs = spawn(
                reader_main,
                [
                    (
                        target.port,
                        target.path,
                        [market_setup(names, i) for i in range(p, args.readers, 2)],
                        f"127.0.0.{40 + p}",
                        control,
                        out,
                    )
                    for p in range(2)
                ],
            )
            if stallers:
                procs += spawn(
                    staller_main,
                    [
                        (
                            target.port,
                            target.path,
                            [market_setup(names, i) for i in range(stallers)],
                            "127.0.0.45",
                            control,
                            out,
                        )
                    ],
                )
            for _ in procs:
                assert out.get(timeout=120)[0] == "ready"
            every = ",".join(f'"{n}@depth","{n}@trades"' for n in names)
            probe = Probe(target, [f'{{"op":"subscribe","channel":[{every}]}}'.encode()])
            kinds = [("depth", 10), ("trades", 10), ("ticker", 1)]  # per symbol per second
            publishers = {k: target.publisher([f"{k}_{s}" for s in names]) for k, _ in kinds}
            cpu0, t0 = target.cpu(), time.perf_counter()
            sent, tick, start = 0, 0, time.perf_counter()
            while time.perf_counter() - start < args.duration:
                tick += 1
                for kind, per_s in kinds:
                    if tick % (10 // per_s) == 0:
                        make = market_message(kind)
                        publishers[kind]([make(tick, 0) for _ in names])
                        sent += len(names)
                time.sleep(max(0.0, start + tick / 10 - time.perf_counter()))
            time.sleep(1.0)  # let the readers take the last messages
            control[1] = 1
            probe_lat = probe.collect()
            frames = gaps = resyncs = 0
            client_cpu = 0.0
            lat: list[int] = []
            for _ in procs:
                msg = out.get(timeout=60)
                if len(msg) == 6:
                    frames, gaps, resyncs = frames + msg[1], gaps + msg[2], resyncs + msg[3]
                    lat += msg[4]
                    client_cpu += msg[5]
            for p in procs:
                p.join()
            elapsed = time.perf_counter() - t0
            cpu = target.cpu() - cpu0
        lat.sort()
        result = row(
            "market",
            "pushd",
            f"readers={args.readers} stallers={stallers}",
            delivered=frames / elapsed,
            per_cpu_s=frames / cpu if cpu else 0.0,
            p50=pct(probe_lat, 0.5),
            p99=pct(probe_lat, 0.99),
            p999=pct(probe_lat, 0.999),
            max=probe_lat[-1] / 1e6 if probe_lat else float("nan"),
            load_p99=pct(lat, 0.99),
            lost=gaps,
            resyncs=resyncs,
            cpu_pct=100 * cpu / elapsed,
            client_cpu_pct=100 * client_cpu / elapsed,
        )
        rows.append(result)
        print_row(result)
    return rows


# -- output ----------------------------------------------------------------------------------

COLUMNS = (
    "delivered",
    "per_cpu_s",
    "p50",
    "p99",
    "p999",
    "max",
    "load_p99",
    "lost",
    "resyncs",
    "cpu_pct",
    "rss_mib",
    "per_conn_kib",
    "flush_round_ms",
    "loop_stall_ms",
    "server_kib_per_conn",
    "kernel_kib_per_conn",
    "idle_kib_per_conn",
    "conns_per_s",
    "client_cpu_pct",
    "client_limit",
    "redis_us_msg",
    "per_cpu_s_with_redis",
    "runs",
)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return str(value)


def print_row(result: dict[str, Any]) -> None:
    print(
        f"  {result['scenario']:<9} {result['target']:<10} {result['params']:<28} "
        + "  ".join(f"{k}={fmt(result[k])}" for k in COLUMNS if k in result),
        flush=True,
    )


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, target, params): the median of each figure over the runs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["target"], r["params"]), []).append(r)
    out = []
    for (scenario, target, params), group in groups.items():
        merged = row(scenario, target, params, runs=len(group))
        for key in group[0]:
            if key not in merged:
                values = [g[key] for g in group if key in g]
                merged[key] = (
                    max(values) if isinstance(values[0], str)  # "yes" if any run says so
                    else statistics.median(values)
                )  # fmt: skip
        out.append(merged)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    head = ["scenario", "target", "params", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in head) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """pushd/peer at the highest rate both held, per scenario and headline figure."""
    out = []
    best = {
        r["target"]: max(
            x["delivered"]
            for x in rows
            if x["scenario"] == "broadcast" and x["target"] == r["target"]
        )
        for r in rows
        if r["scenario"] == "broadcast"
    }
    for peer in ("websockets", "nchan"):
        if "pushd" in best and best.get(peer):
            out.append(
                f"broadcast max delivered: pushd/{peer} = {best['pushd'] / best[peer]:.2f} "
                f"({best['pushd']:,.0f} vs {best[peer]:,.0f} msgs/s)"
            )
    for scenario, key in (
        ("broadcast", "per_cpu_s"),
        ("broadcast", "delivered"),
        ("idle", "per_conn_kib"),
        ("storm", "conns_per_s"),
    ):
        mine = [r for r in rows if r["scenario"] == scenario and r["target"] == "pushd"]
        for peer in ("websockets", "nchan"):
            theirs = [r for r in rows if r["scenario"] == scenario and r["target"] == peer]
            pairs = [(a, b) for a in mine for b in theirs if a["params"] == b["params"]]
            if pairs:
                a, b = pairs[-1]
                if b.get(key):
                    out.append(
                        f"{scenario} {key}: pushd/{peer} = {a[key] / b[key]:.2f} ({a['params']})"
                    )
    return out


SCENARIOS: dict[str, Callable[[argparse.Namespace, list[str]], list[dict[str, Any]]]] = {
    "broadcast": broadcast,
    "market": market,
    "private": private,
    "idle": idle,
    "storm": storm,
    "stalled": stalled,
}


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
        "--pushd-limits",
        default="",
        help='[limits] lines for pushd, e.g. "coalesce_ms = 5" (experiments)',
    )
    args = parser.parse_args()
    Pushd.limits = args.pushd_limits.replace(";", "\n") + "\n"
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
