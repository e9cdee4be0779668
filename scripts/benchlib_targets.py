"""The benchmark's targets: each server under test (how to start it as its own process tree on
the server core, subscribe to it and publish to it) and pushd's HTTP publisher.

``scripts/bench.py`` runs them; its docstring describes each target."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h11
from bench_client import TLS_CA
from benchlib import free_port, metrics, proc_cpu_seconds, proc_rss_kib, wait_ready
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from ingest import wire
from ingest.framing import Framer

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
PUBLISH_TOKEN = "bench-token"
SECRET = "bench-secret"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
ENGINE_SRC = 9  # the backend source of the engine-link publishers
ENGINE_KEY = "bench-engine-key-" + "k" * 32


class Target:
    """A server under test: how to start it, subscribe to it, publish to it."""

    name = ""
    path = "/"
    setup: list[bytes] = []  # frames each subscriber sends after the upgrade (pushd: subscribe)
    stamp = b'"t":'  # the key of a frame's publish time (ns), which the clients read
    # the publisher waits for each publish's answer before the next (``--publisher waiting``);
    # else it sends each at once, pipelined (HTTP) or as a frame (WebSocket, engine link)
    waiting = False
    can_wait = True  # False: no publisher of this target can wait for an answer
    # a broadcast message (n, size) -> JSON; None: benchlib_load.message
    make: Callable[[int, int], bytes] | None = None

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
    fills the socket, or has WINDOW answers outstanding, and the publisher waits.

    The answers are parsed by h11. h11 does not pipeline (a client sends its next request once
    the answer to the last one is in), so ``post`` writes the request bytes itself and the
    reader's h11 connection is told of each request (``_EXPECT``) just before it reads the
    answer: h11 then checks each answer's framing and keeps what follows it for the next."""

    WINDOW = 100  # publishes in flight at most: a server far behind holds the publisher
    PER_CONNECTION = 1000  # hypercorn's keep_alive_max_requests: then a new connection
    # what the reader tells h11 was sent (the body is already on the wire: not h11's business)
    _EXPECT = h11.Request(
        method="POST", target="/v1/publish/batch",
        headers=[("host", "127.0.0.1"), ("content-length", "0")],
    )  # fmt: skip

    def __init__(self, port: int, window: int = WINDOW) -> None:
        self.port = port
        self.window = window
        self._room = threading.Semaphore(window)
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
        """Every answer on ``sock``, in order, until the server closes it."""
        http = h11.Connection(h11.CLIENT)
        while True:
            http.send(self._EXPECT)
            http.send(h11.EndOfMessage())
            status = self._answer(http, sock)
            if status is None:
                return
            self.answered += 1
            self.refused += status >= 300
            self._room.release()
            if http.their_state is not h11.DONE or http.our_state is not h11.DONE:
                return  # the server closes after this answer (its keep-alive limit)
            http.start_next_cycle()

    @staticmethod
    def _answer(http: h11.Connection, sock: socket.socket) -> int | None:
        """The status of the next whole answer, or None if the connection ended first."""
        status = None
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:  # closed with no answer owed: the server stopped
                return None
            if event is h11.NEED_DATA:
                try:
                    http.receive_data(sock.recv(1 << 20))
                except OSError:
                    return None
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                return status
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def wait(self) -> None:
        """Until every request sent has its answer (a publisher that waits for each)."""
        for _ in range(self.window):
            self._room.acquire()
        for _ in range(self.window):
            self._room.release()

    def close(self) -> None:
        if self.refused:
            print(f"# {self.refused} of {self.answered} publishes refused", file=sys.stderr)
        for sock in self.socks:
            sock.close()


def engine_ingest(port: int) -> str:
    """pushd's ``[ingest]`` lines for an engine link on ``port`` with the benchmarks' backend
    source (``EngineLink``'s)."""
    return (
        f"tcp_port = {port}\nsources = [{{id = {ENGINE_SRC}, key = '{ENGINE_KEY}', "
        f"backend = true, silent_after_s = 0}}]\n"
    )


class EngineLink:
    """A backend's engine-link connection to pushd (docs/wire.md, "Publishing from a backend"):
    sealed frames out, acks in."""

    def __init__(self, port: int) -> None:
        self.framer = Framer(ENGINE_SRC, key=ENGINE_KEY.encode())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.acks = wire.StreamDecoder()
        self.sock.sendall(self.framer.tcp_frame([wire.Heartbeat()], ack=True))
        self.ack()

    def ack(self) -> wire.Ack:
        while (body := self.acks.next_body()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("pushd closed the engine link")
            self.acks.feed(data)
        return wire.decode_ack(body)

    def publish(self, channel: str, messages: list[bytes], ack: bool) -> None:
        """One frame of one ``publish`` event per message; ``ack``: wait for its verdict."""
        events = [wire.Publish(channel, m) for m in messages]
        self.sock.sendall(self.framer.tcp_frame(events, ack=ack))
        if ack and (
            (got := self.ack()).refused
            or got.seq != self.framer.seq
            or got.verdict not in ("in_order", "gap", "restart")
        ):
            raise RuntimeError(f"publish not taken: {got}")

    def close(self) -> None:
        self.sock.close()


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
        self.ws_port = self.port  # pushd's own listener (another target's clients may not)
        self.ingest = "tcp_enabled = false\n"  # [ingest] lines beyond UDP's (engine link)

    def start(self, connections: int) -> None:
        markets = "".join(f"[markets.{s}]\n" for s in self.symbols)
        config = self.tmp / "pushd.toml"
        config.write_text(
            f"[websocket]\nport = {self.ws_port}\nmax_connections = {connections + 500}\n"
            f"max_connections_per_ip = {connections + 500}\nhandshakes_per_second = 1e6\n"
            f"[http]\nport = {self.http_port}\npublish_token = '{PUBLISH_TOKEN}'\n"
            f"max_batch = 10000\nallow_market_publish = true\n[auth.hmac]\nsecret = '{SECRET}'\n"
            f"[limits]\nmax_subscriptions = 200\n{self.extra_limits}"
            f"[engine]\nsnapshot_enabled = false\n"
            f"[ingest]\nudp_enabled = false\n{self.ingest}"
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
        pipeline = HttpPipeline(self.http_port, 1 if self.waiting else HttpPipeline.WINDOW)
        self.pipelines.append(pipeline)

        def publish(batch: list[bytes]) -> None:
            items = b",".join(
                b'{"channel":"%s","data":%s}' % (names[next(turn) % len(names)], message)
                for message in batch
            )
            pipeline.post(b"/v1/publish/batch", b'{"messages":[' + items + b"]}")
            if self.waiting:
                pipeline.wait()

        return publish

    def stop(self) -> None:
        for pipeline in self.pipelines:
            pipeline.close()
        super().stop()

    def gc_full(self) -> tuple[float, float]:
        """Full garbage collections so far, and the seconds they stopped the server (from
        ``pushd_gc_pause_seconds``; NaN from a pushd that does not export it)."""
        samples = metrics(self.http_port)
        key = (("generation", "2"),)
        nan = float("nan")
        return (
            samples.get(("pushd_gc_pause_seconds_count", key), nan),
            samples.get(("pushd_gc_pause_seconds_sum", key), nan),
        )


class PushdEngine(Pushd):
    """pushd published to as a backend can (docs/wire.md): over its engine link, one TCP
    connection of sealed frames, a frame of one ``publish`` event per message (a burst: one
    frame of that many), to ``notice``, which the subscribers follow; ``--publisher waiting``:
    each frame asks for its ack and the next waits for it. The peers' like: nchan's WebSocket
    publisher (pipelined) and its HTTP POST (waiting). The HTTP API's request costs ~0.7 ms
    of server CPU (BENCHMARKS.md), the engine link's ~20 µs pipelined, 150-250 µs waiting."""

    name = "pushd-engine"
    setup = [b'{"op":"subscribe","channel":"notice"}']
    channel = "notice"

    def __init__(self, symbols: int = 3) -> None:
        super().__init__(symbols)
        self.engine_port = free_port()
        self.ingest = engine_ingest(self.engine_port)
        self.links: list[EngineLink] = []

    def publisher(self, channels: list[str] | None = None) -> Callable[[list[bytes]], None]:
        names = channels or [self.channel]
        turn = itertools.count()
        link = EngineLink(self.engine_port)
        self.links.append(link)

        def publish(batch: list[bytes]) -> None:
            link.publish(names[next(turn) % len(names)], batch, self.waiting)

        return publish

    def stop(self) -> None:
        for link in self.links:
            link.close()
        super().stop()


def trade_message(n: int, size: int) -> bytes:
    """A trade batch of one trade (what Binance's ``@trade`` is made of), stamped with the
    publish time in ns twice: ``t`` (pushd's frame carries the data as published) and the
    trade's ``ts`` (Binance's ``E``); padded to ``size`` where it is shorter."""
    now = time.time_ns()
    body = (b'{"t":%d,"s":"BTCUSDT","trades":[{"id":%d,"price":"65000.1","qty":"0.001",'
            b'"side":"buy","ts":%d}],"pad":"' % (now, n, now))  # fmt: skip
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


class PushdBinance(Pushd):
    """pushd with its Binance spot surface on; the clients connect there and ``SUBSCRIBE``
    Binance streams (``btcusdt@trade``), which are views of the same channels pushd's own
    clients follow; the publisher is pushd's (``trades_BTCUSDT`` by HTTP batch publish), each
    message a batch of one trade (``trade_message``): one ``trade`` frame per message. The
    clients read the publish time from ``E``. Server pings every hour (the native surface
    sends none; the load generator answers none)."""

    name = "pushd-binance"
    setup = [b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}']
    stamp = b'"E":'
    make = staticmethod(trade_message)

    def __init__(self, symbols: int = 3) -> None:
        super().__init__(symbols)
        self.ws_port = free_port()
        self.extra_config = (
            f"[binance.spot]\nenabled = true\nport = {self.port}\nping_interval_s = 3600\n"
        )

    def start(self, connections: int) -> None:
        super().start(connections)
        self._wait_port()


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
    can_wait = False  # its /pub answers nothing

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
    location = /pub {{ nchan_publisher http websocket; nchan_channel_id bench;
                       nchan_message_buffer_length 16; nchan_message_timeout 30s; }}
  }}
}}
""")
        self._spawn(["nginx", "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL)
        self._wait_port()

    def publisher(self) -> Callable[[list[bytes]], None]:
        if not self.waiting:
            return WsPublisher(self.port, "/pub")
        pipeline = HttpPipeline(self.port, 1)  # nchan's HTTP publish: POST, 201/202 with info

        def publish(batch: list[bytes]) -> None:
            for message in batch:
                pipeline.post(b"/pub", message)
                pipeline.wait()

        return publish


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
    "pushd-binance": PushdBinance,
    "pushd-engine": PushdEngine,
}
DEFAULT_TARGETS = ["pushd", "websockets", "nchan"]


@contextmanager
def running(target: Target, connections: int) -> Iterator[Target]:
    target.start(connections)
    try:
        yield target
    finally:
        target.stop()
