"""Fuzzing every surface of a real ``pushd run`` process over real sockets.

Surfaces: the WebSocket handshake, WebSocket frames, client requests, ingest UDP datagrams and
TCP streams, the HTTP API (schemathesis, from the OpenAPI document the daemon serves), and TLS
(garbage and mutated ClientHellos on a wss:// port, and the handshake fuzz inside TLS).
After each: the daemon still serves, no peer tripped the per-connection error boundary (that
boundary keeps the process alive, so a bug it catches would otherwise go unnoticed), and its
RSS did not grow past ``RSS_SLACK_KIB``.

``PUSHD_FUZZ_EXAMPLES`` sets the cases per surface (CI: a few hundred); ``scripts/fuzz.py`` runs
the long version and prints the table that BENCHMARKS.md quotes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import trustme
from conftest import PUBLISH_TOKEN, SECRET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_servers import RedisServer
from scrape import Scrape
from wsframes import KEY, client_frame, frames, read_frame, ws_connect
from wsproto.frame_protocol import FrameDecoder, Opcode

from ingest import wire

EXAMPLES = int(os.environ.get("PUSHD_FUZZ_EXAMPLES", "300"))
REPORT = os.environ.get("PUSHD_FUZZ_REPORT")  # a JSON-lines file the long run reads
RSS_SLACK_KIB = int(os.environ.get("PUSHD_FUZZ_RSS_SLACK_KIB", "16384"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    ws: int
    http: int
    udp: int
    tcp: int
    log: Path
    client_tls: ssl.SSLContext | None = None  # a wss:// daemon: how its clients connect

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match[1])

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics").read().decode()
        return Scrape(text).total(name, **labels)

    def check_alive(self) -> None:
        """A fresh WebSocket client gets a pong; the process is still there."""
        assert self.proc.poll() is None, "the daemon died"
        with ws_connect(self.ws, self.client_tls) as sock:
            sock.sendall(client_frame(1, b'{"op":"ping","id":"alive"}'))
            reply = read_text_frame(sock)
            assert json.loads(reply)["id"] == "alive"

    def check_no_internal_errors(self) -> None:
        log = self.log.read_text()
        assert "connection failed" not in log and "flush failed" not in log, log[-4000:]
        for failure in ("engine frame failed", "ingest peer failed", "market tick failed",
                        "book snapshot failed", "Error in ASGI Framework"):  # fmt: skip
            assert failure not in log, log[-4000:]
        assert self.metric("pushd_connections_closed_by_server_total", reason="internal_error") == 0


def spawn_daemon(tmp: Path, config_text: str) -> Iterator[Daemon]:
    """``pushd run`` on ``config_text`` (port 0 everywhere: the ports bound come from its ready
    line), once it answers /readyz; terminated after the ``yield``. Its stdout and stderr go to
    ``tmp / "daemon.log"`` (a JSON log: ``[log] format = 'json'``)."""
    config = tmp / "pushd.toml"
    config.write_text(config_text)
    log = tmp / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pushd", "run", "--config", str(config)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (ready := [line for line in log.read_text().splitlines()
                             if '"pushd ready"' in line]):  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # a file another process writes: nothing to await
        ports = json.loads(ready[0])
        running = Daemon(proc, ports["websocket"], ports["http"], ports["ingest_udp"],
                         ports["ingest_tcp"], log)  # fmt: skip
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{running.http}/readyz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield running
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_daemon(tmp: Path, extra_config: str = "") -> Iterator[Daemon]:
    """A real ``pushd run`` process on free ports, with limits opened for fuzzing."""
    yield from spawn_daemon(
        tmp,
        (
            "[websocket]\nport = 0\nmax_connections_per_ip = 100000\n"
            "handshakes_per_second = 1e9\n"
            f"[http]\nport = 0\npublish_token = '{PUBLISH_TOKEN}'\n"
            f"[auth.hmac]\nsecret = '{SECRET}'\n[engine]\nsnapshot_enabled = false\n"
            "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
            "udp_port = 0\ntcp_port = 0\n"
            "[limits]\nmessages_per_second = 1e9\nmessage_burst = 1000000\n"
            "failed_logins_per_minute = 1e9\nfailed_login_burst = 1000000\n"
            "handshake_timeout_s = 2.0\n"
            "frames_per_second = 1e9\nframe_burst = 1000000\n"  # the budget has its own tests
            f"[log]\nformat = 'json'\nlevel = 'info'\n{extra_config}"
        ),
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from run_daemon(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def redis_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The same on the Redis bus (a private redis-server): requests with ``since`` reach the
    recover script, publishes the publish script, REST the stored states."""
    with RedisServer() as redis:
        yield from run_daemon(
            tmp_path_factory.mktemp("fuzz-redis"),
            f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = '{redis.url}'\n",
        )


@pytest.fixture(params=["memory", "redis"])
def bus_daemon(request: pytest.FixtureRequest) -> Daemon:
    """The surfaces that reach the bus run on both buses."""
    name = "daemon" if request.param == "memory" else "redis_daemon"
    chosen: Daemon = request.getfixturevalue(name)
    return chosen


def record(surface: str, cases: int, before: int, after: int) -> None:
    if REPORT:
        with open(REPORT, "a") as out:
            out.write(json.dumps({"surface": surface, "cases": cases, "rss_before_kib": before,
                                  "rss_after_kib": after}) + "\n")  # fmt: skip


class Surface:
    """Counts the cases of one surface, checks liveness every so often, and the RSS bound."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon, self.name, self.cases = daemon, name, 0

    def __enter__(self) -> Surface:
        self.daemon.check_alive()
        self.before = self.daemon.rss_kib()
        return self

    def case(self) -> None:
        self.cases += 1
        if self.cases % 500 == 0:
            self.daemon.check_alive()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        self.daemon.check_alive()
        self.daemon.check_no_internal_errors()
        after = self.daemon.rss_kib()
        record(self.name, self.cases, self.before, after)
        assert after - self.before < RSS_SLACK_KIB, (self.before, after)


# -- wire helpers (plain blocking sockets: the client side is deliberately dumb) ---------------


def read_text_frame(sock: socket.socket) -> bytes:
    """The payload of the next server frame (text expected; control frames are skipped)."""
    while True:
        opcode, payload = read_frame(sock)
        if opcode is Opcode.TEXT:
            return payload
        if opcode is Opcode.CLOSE:
            raise ConnectionError(f"closed: {payload[:2].hex()}")


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def end(sock: socket.socket, how: int) -> None:
    """Leave as a broken peer would: reset, half-close, or just close."""
    if how == 0:
        reset(sock)
    else:
        if how == 1:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        sock.close()


# -- the handshake ------------------------------------------------------------------------

HEADER_LINES = st.sampled_from([
    b"Host: x", b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Key: " + KEY, b"Origin: http://evil", b"Sec-WebSocket-Version: 99",
    b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Upgrade: h2c", b"X: " + b"a" * 9000,
    b"Sec-WebSocket-Extensions: permessage-deflate", b": nameless", b"Bad Header",
])  # fmt: skip
REQUEST_LINES = st.sampled_from([
    b"GET /ws HTTP/1.1", b"GET / HTTP/1.1", b"GET /nope HTTP/1.1", b"POST /ws HTTP/1.1",
    b"GET /ws HTTP/1.0", b"GET /ws HTTP/2.0", b"GET http://x/ws HTTP/1.1", b"GET", b"",
    b"GET /ws?x=%zz HTTP/1.1", b"\x16\x03\x01\x02\x00",
])  # fmt: skip
HANDSHAKES = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda line, headers, sep, tail: line + b"\r\n" + b"\r\n".join(headers) + sep + tail,
        REQUEST_LINES, st.lists(HEADER_LINES, max_size=8),
        st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n", b""]), st.binary(max_size=64),
    ),
)  # fmt: skip


def test_handshake_fuzz(daemon: Daemon) -> None:
    @FUZZ
    @given(HANDSHAKES, st.integers(1, 4), st.integers(0, 2), st.booleans())
    def case(data: bytes, pieces: int, how: int, wait_answer: bool) -> None:
        surface.case()
        sock = socket.create_connection(("127.0.0.1", daemon.ws), timeout=5)
        step = max(1, len(data) // pieces)
        try:
            for i in range(0, len(data), step):
                sock.sendall(data[i : i + step])
            if wait_answer and data.endswith(b"\r\n\r\n"):
                sock.settimeout(0.5)
                answer = sock.recv(4096)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
        except (OSError, TimeoutError):
            pass
        end(sock, how)

    with Surface(daemon, "handshake") as surface:
        case()


# -- frames -------------------------------------------------------------------------------

OPCODES = st.one_of(st.sampled_from([0, 1, 2, 8, 9, 10]), st.integers(0, 15))
FRAMES = st.lists(
    st.builds(
        lambda op, payload, fin, rsv, mask, lie: (client_frame(
            op, payload, fin=fin, rsv=rsv, mask=mask,
            length=None if lie is None else lie,
        ), lie is not None),
        OPCODES,
        st.one_of(st.binary(max_size=200), st.just(b'{"op":"ping"}'), st.just(b"\xff\xfe"),
                  st.just(b"\x03\xe8bye"), st.just(b"\x00")),
        st.booleans(), st.sampled_from([0, 0, 0, 1, 4, 7]), st.sampled_from([True] * 5 + [False]),
        st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2**63 - 1)),
    ),
    max_size=12,
)  # fmt: skip
FENCE = b"fence"


def test_frame_fuzz(daemon: Daemon) -> None:
    """Every opcode, fragments with control frames between them, bad masks and lengths, frames
    after a close, then a reset, a half-close or a close."""

    @FUZZ
    @given(FRAMES, st.integers(0, 2), st.booleans())
    def case(frames: list[tuple[bytes, bool]], how: int, drain: bool) -> None:
        surface.case()
        sock = ws_connect(daemon.ws)
        data = b"".join(frame for frame, _lie in frames)
        # unless a length lied (the server then waits for bytes that never come), read until
        # the server has answered a ping sent after the frames, closed, or sent its close
        drain = drain and not any(lie for _frame, lie in frames)
        try:
            sock.sendall(data + (client_frame(9, FENCE) if drain else b""))
            sock.settimeout(5)
            seen = b""
            while drain and not answered(seen):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                seen += chunk
        except OSError:
            pass
        end(sock, how)

    with Surface(daemon, "frames") as surface:
        case()


def answered(data: bytes) -> bool:
    """Whether the server frames in ``data`` include our fence's pong or a close frame."""
    return any(
        opcode is Opcode.CLOSE or (opcode is Opcode.PONG and payload == FENCE)
        for opcode, payload in frames(data)
    )


# -- requests -----------------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(["BTCUSDT@depth", "BTCUSDT@trades", "ETHUSDT@kline_5m", "SOLUSDT@ticker",
                     "@order", "@balance", "notice", "BTCUSDT@trades_", "user_1_order",
                     "XRPUSDT@depth", "@", ""]),
    st.text(max_size=40),
)  # fmt: skip
IDS = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=70),
                st.floats(), st.booleans(), st.lists(st.integers(0, 9), max_size=2))  # fmt: skip
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)  # fmt: skip
REQUESTS = st.one_of(
    st.fixed_dictionaries({"op": st.just("subscribe"),
                           "channel": st.one_of(NAMES, st.lists(NAMES, max_size=5))},
                          optional={"id": IDS}),
    st.fixed_dictionaries({"op": st.just("unsubscribe"),
                           "channel": st.one_of(NAMES, st.lists(NAMES, max_size=5))},
                          optional={"id": IDS}),
    st.fixed_dictionaries({"op": st.just("auth"), "token": st.text(max_size=100)},
                          optional={"id": IDS}),
    st.fixed_dictionaries({"op": st.sampled_from(["ping", "PING", "pong", 1, None])},
                          optional={"id": IDS}),
    st.dictionaries(st.sampled_from(["op", "channel", "id", "token", "x"]), JSON, max_size=4),
    JSON,
).map(lambda r: msgspec.json.encode(r))  # fmt: skip
MUTATED = st.one_of(
    REQUESTS,
    st.builds(lambda r, cut: r[:cut], REQUESTS, st.integers(0, 60)),  # truncated
    st.builds(lambda r, b: r + b, REQUESTS, st.binary(max_size=8)),  # trailing garbage
    st.binary(max_size=200),
)  # fmt: skip


def test_request_fuzz(bus_daemon: Daemon) -> None:
    """Each request gets exactly one reply of a documented shape, and the connection stays."""
    sock = ws_connect(bus_daemon.ws)

    @FUZZ
    @given(MUTATED)
    def case(request: bytes) -> None:
        surface.case()
        try:
            text = request.decode()
        except UnicodeDecodeError:
            return  # invalid UTF-8 in a text frame ends the connection (1007): frame fuzz's
        sock.sendall(client_frame(1, request))
        sock.sendall(client_frame(1, b'{"op":"ping","id":"fence"}'))
        replies = []
        while True:
            reply = json.loads(read_text_frame(sock))
            if reply.get("id") == "fence" and reply.get("op") == "pong":
                break
            replies.append(reply)
        events = [r for r in replies if "event" in r]  # current state of a new subscription
        answers = [r for r in replies if "event" not in r]
        assert len(answers) == 1, (text, replies)
        answer = answers[0]
        assert (
            answer.get("result") is True
            or answer.get("op") == "pong"
            or (isinstance(answer.get("code"), int) and isinstance(answer.get("msg"), str))
        ), (text, answer)
        assert all(e["event"] and isinstance(e["seq"], int) for e in events)

    with Surface(bus_daemon, "requests") as surface:
        case()
    sock.close()


# -- ingest --------------------------------------------------------------------------------

DECIMALS = st.one_of(st.sampled_from(["1", "0", "-0", "65000.1", "1e5", "NaN", "", "0.", ".5",
                                      "9" * 31, "1." + "0" * 31, "١٢"]),
                     st.text(max_size=12))  # fmt: skip
SYMBOL_NAMES = st.sampled_from(["BTCUSDT", "ETHUSDT", "XRPUSDT", "btcusdt", "", "A" * 40])
EVENTS = st.one_of(
    st.builds(lambda sym, i, p, q, ts: {"type": "trade", "symbol": sym, "id": i, "price": p,
                                       "qty": q, "side": "buy", "ts": ts},
              SYMBOL_NAMES, st.integers(-1, 2**64 - 1), DECIMALS, DECIMALS, st.integers(-1, 2**63)),
    st.builds(lambda uid, f: {"type": "account", "uid": uid, "fields": f, "ts": 1},
              st.sampled_from(["1001", "", "../x", "a" * 70]),
              st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=50)),
    st.builds(lambda sym, src, p: {"type": "index", "symbol": sym, "source": src, "price": p,
                                   "ts": 1}, SYMBOL_NAMES, st.text(max_size=40), DECIMALS),
    st.builds(lambda sym, n: {"type": "book", "symbol": sym, "request_id": 1, "update_id": 1,
                              "bids": [["1", "1"]] * n, "asks": [], "ts": 1},
              SYMBOL_NAMES, st.integers(0, 3000)),
    st.dictionaries(st.sampled_from(["type", "symbol", "uid", "ts"]), JSON, max_size=4),
)  # fmt: skip
ENVELOPES = st.builds(
    lambda src, epoch, seq, events: {"src": src, "epoch": epoch, "seq": seq, "events": events},
    st.sampled_from([1, 2, 0, -1, 2**32, 2**32 - 1]),
    st.sampled_from([1, 2, 0, 2**63 - 1, 2**64 - 1]),
    st.one_of(st.integers(1, 5), st.sampled_from([0, 2**63 - 1, 2**64 - 1])),
    st.lists(EVENTS, max_size=5),
)  # fmt: skip
DATAGRAMS = st.one_of(
    st.binary(max_size=300),
    ENVELOPES.map(lambda e: msgspec.msgpack.encode(e)),
    st.builds(lambda e, cut: msgspec.msgpack.encode(e)[:cut], ENVELOPES, st.integers(0, 50)),
)  # fmt: skip


def test_ingest_udp_fuzz(daemon: Daemon) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad_before = daemon.metric("pushd_ingest_frames_total", verdict="bad")

    @FUZZ
    @given(DATAGRAMS)
    def case(datagram: bytes) -> None:
        surface.case()
        if len(datagram) <= 65_000:
            sock.sendto(datagram, ("127.0.0.1", daemon.udp))

    with Surface(daemon, "ingest_udp") as surface:
        case()
        sock.sendto(b"\xc1", ("127.0.0.1", daemon.udp))  # surely bad
        deadline = time.monotonic() + 10
        while daemon.metric("pushd_ingest_frames_total", verdict="bad") <= bad_before:
            assert time.monotonic() < deadline  # the bad ones were counted
            time.sleep(0.05)
    sock.close()


def test_ingest_tcp_fuzz(daemon: Daemon) -> None:
    frames = st.one_of(
        DATAGRAMS.map(lambda body: struct.pack(">I", len(body)) + body),
        st.binary(max_size=64),  # unframed junk, impossible lengths
    )

    @FUZZ
    @given(st.lists(frames, max_size=6), st.integers(0, 2))
    def case(stream: list[bytes], how: int) -> None:
        surface.case()
        sock = socket.create_connection(("127.0.0.1", daemon.tcp), timeout=5)
        with contextlib.suppress(OSError):
            sock.sendall(b"".join(stream))
        end(sock, how)

    with Surface(daemon, "ingest_tcp") as surface:
        case()


# -- HTTP: schemathesis from the served OpenAPI document ----------------------------------


def test_http_api_fuzz(bus_daemon: Daemon, tmp_path: Path) -> None:
    """Every operation of /openapi.json, positive and negative cases, all of schemathesis'
    checks (no 5xx, documented status codes and content types, schema-valid requests
    accepted and invalid ones refused). It runs in a temporary folder: schemathesis keeps its
    cache (``.schemathesis/``) in the working directory, never in the checkout."""
    with Surface(bus_daemon, "http_api") as surface:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("st")),
             "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
             f"http://127.0.0.1:{bus_daemon.http}/openapi.json",
             "-H", f"Authorization: Bearer {PUBLISH_TOKEN}", "--checks", "all",
             "-n", str(max(10, EXAMPLES // 10)), "--no-color", "--generation-database", "none",
             "--workers", "1"],
            capture_output=True, text=True, timeout=3000, stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-6000:]
        generated = re.search(r"(\d+) generated", result.stdout)
        assert generated is not None, result.stdout[-2000:]
        surface.cases = int(generated[1])


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz-tls")
    ca = trustme.CA()
    pem = tmp / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    for running in run_daemon(tmp, f"[websocket.tls]\ncertificate = '{pem}'\nkey = '{pem}'\n"):
        running.client_tls = ssl.create_default_context()
        ca.configure_trust(running.client_tls)
        yield running


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of a client would send it."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()
TLS_INPUT = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda flips: bytes(_flip(HELLO, flips)),
              st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)),
                       min_size=1, max_size=8)),
    st.builds(lambda cut: HELLO[:cut], st.integers(0, len(HELLO))),
)  # fmt: skip


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for at, value in flips:
        out[at] = value
    return out


def test_tls_fuzz(tls_daemon: Daemon) -> None:
    """Before the handshake: garbage, mutated and cut ClientHellos. After a good one: the
    handshake fuzz inside TLS. Each peer ends alone; wss:// clients are served throughout."""
    assert tls_daemon.client_tls is not None
    client_tls = tls_daemon.client_tls

    @FUZZ
    @given(TLS_INPUT, HANDSHAKES, st.booleans(), st.integers(0, 2))
    def case(raw: bytes, inside: bytes, handshake_first: bool, how: int) -> None:
        surface.case()
        sock = socket.create_connection(("127.0.0.1", tls_daemon.ws), timeout=5)
        try:
            if handshake_first:
                sock = client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
                sock.sendall(inside)
            else:
                sock.sendall(raw)
                sock.settimeout(0.05)  # an alert comes at once; a cut hello gets nothing
                sock.recv(4096)
        except (OSError, TimeoutError):
            pass
        end(sock, how)

    with Surface(tls_daemon, "tls") as surface:
        case()


def test_fuzz_cases_reach_real_frames() -> None:
    """The frame helper makes what a server can parse (so the fuzz starts from real frames)."""
    decoder = FrameDecoder(client=False, extensions=[])
    decoder.receive_bytes(client_frame(1, b"hello") + client_frame(9, b"p"))
    first, second = decoder.process_buffer(), decoder.process_buffer()
    assert first is not None and bytes(first.payload) == b"hello"
    assert second is not None and second.payload == b"p"
    assert wire.decode(msgspec.msgpack.encode(
        {"src": 1, "epoch": 1, "seq": 1, "events": [{"type": "index", "symbol": "BTCUSDT",
                                                    "source": "a", "price": "1", "ts": 1}]}
    )).seq == 1  # fmt: skip
