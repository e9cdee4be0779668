#!/usr/bin/env python3
"""Publish benchmark: server CPU per single-message publish, by way in and by publisher.

    .venv/bin/python scripts/bench_publish.py --publishes 2000 --subscribers 0 100 --rounds 3

Starts ``pushd run`` (memory bus) pinned to core 0 as its own process; this script runs on
core 1. Each case sends ``--publishes`` single-message publishes to ``notice`` and reads the
server process's CPU (``/proc/<pid>/stat``) before and after, once the last one is in:

- ``http-wait``: ``POST /v1/publish``, one request, wait for its answer, the next (keep-alive);
- ``http-pipe``: the same requests pipelined on one connection, up to 100 in flight
  (``benchlib_targets.HttpPipeline``, the harness's publisher);
- ``engine-wait``: over the authenticated engine link (TCP, sealed frames), one ``publish``
  event per frame, each frame asking for an ack (``"ack": true``), the next sent once the
  ack is in (docs/wire.md);
- ``engine-pipe``: the same frames sent back to back; only the last asks for an ack, which
  says every frame before it was taken (acks come in order).

With subscribers, that many WebSocket connections follow ``notice`` and read everything; the
case ends once one of them (which counts) has every message. Cases alternate within a round,
and each round starts a fresh server; the report is the median per case of the rounds.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import msgspec
from benchlib import free_port, proc_cpu_seconds, wait_ready
from benchlib_targets import PUBLISH_TOKEN, EngineLink, HttpPipeline, engine_ingest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

CASES = ("http-wait", "http-pipe", "engine-wait", "engine-pipe")
MESSAGE = b'{"kind":"bench","text":"maintenance at 02:00 UTC","n":%d}'


def start_server(tmp: Path, engine: bool) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """A pushd with the publish token and (``engine``) a backend engine source."""
    http, ws, tcp = free_port(), free_port(), free_port()
    config = tmp / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = {ws}\nmax_connections = 2000\nmax_connections_per_ip = 2000\n"
        f"handshakes_per_second = 1e6\n[http]\nport = {http}\npublish_token = '{PUBLISH_TOKEN}'\n"
        f"[auth.hmac]\nsecret = 'bench-secret'\n[engine]\nsnapshot_enabled = false\n"
        f"[ingest]\nudp_enabled = false\n"
        + (engine_ingest(tcp) if engine else "tcp_enabled = false\n")
        + "[log]\nlevel = 'warning'\nformat = 'json'\n[markets.BTCUSDT]\n"
    )
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    server = subprocess.Popen(
        [*taskset, sys.executable, "-m", "pushd", "run", "--config", str(config)],
        stderr=open(tmp / "stderr.log", "wb"),  # noqa: SIM115 (kept for the run)
    )
    wait_ready(http)
    return server, http, ws, tcp


class Subscribers:
    """``n`` WebSocket connections on ``notice``; the first counts what it gets, a thread
    drains the others."""

    def __init__(self, port: int, n: int) -> None:
        self.last = -1  # the last message the counting subscriber got
        self.resyncs = 0  # resync notices it got instead of messages (it lagged)
        self._partial = ""
        self.heard = time.monotonic()  # when the counting subscriber last got a frame
        self.socks: list[socket.socket] = []
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._stop = False
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            ws = self._ws if i == 0 else WSConnection(ConnectionType.CLIENT)
            sock.sendall(ws.send(Request(host="127.0.0.1", target="/ws")))
            accepted = False
            while not accepted:
                ws.receive_data(sock.recv(65536))
                accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
            sock.sendall(ws.send(TextMessage('{"op":"subscribe","channel":"notice"}')))
            self.socks.append(sock)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        if n:
            self._thread.start()

    def _drain(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        counter = self.socks[0]
        while not self._stop:
            for key, _ in selector.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if sock is counter:
                    self._ws.receive_data(data)
                    for event in self._ws.events():
                        if isinstance(event, TextMessage):  # wsproto hands out fragments
                            self._partial += event.data
                            if event.message_finished:
                                self._count(msgspec.json.decode(self._partial))
                                self._partial = ""

    def _count(self, frame: Any) -> None:
        self.heard = time.monotonic()
        data = frame.get("data") if isinstance(frame, dict) else None
        if isinstance(data, dict) and data.get("kind") == "bench":
            self.last = data["n"]
        elif isinstance(frame, dict) and "resync" in str(frame):
            self.resyncs += 1  # it lagged (the client's core is the limit): pushd skipped it on

    def wait(self, last: int, timeout_s: float = 120.0) -> None:
        """Until the counting subscriber has message ``last``, or (it lagged, and was told
        what it missed instead) nothing more for a second."""
        deadline = time.monotonic() + timeout_s
        while self.last != last:
            if self.resyncs and time.monotonic() - self.heard > 1.0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"subscriber's last message {self.last}, not {last}")
            time.sleep(0.002)

    def close(self) -> None:
        self._stop = True
        for sock in self.socks:
            sock.close()


def http_wait(port: int, n: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    http = h11.Connection(h11.CLIENT)
    head = [("host", "127.0.0.1"), ("authorization", f"Bearer {PUBLISH_TOKEN}"),
            ("content-type", "application/json")]  # fmt: skip
    for i in range(n):
        body = b'{"channel":"notice","data":%s}' % (MESSAGE % i)
        if http.our_state is h11.MUST_CLOSE or http.their_state is h11.MUST_CLOSE:
            sock.close()  # hypercorn's keep-alive limit: a new connection
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            http = h11.Connection(h11.CLIENT)
        headers = [*head, ("content-length", str(len(body)))]
        sock.sendall(
            http.send(h11.Request(method="POST", target="/v1/publish", headers=headers))
            + http.send(h11.Data(data=body))
            + http.send(h11.EndOfMessage())
        )
        status = HttpPipeline._answer(http, sock)
        if status != 200:
            raise RuntimeError(f"publish answered {status}")
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
    sock.close()


def http_pipe(port: int, n: int) -> None:
    pipeline = HttpPipeline(port)
    for i in range(n):
        pipeline.post(b"/v1/publish", b'{"channel":"notice","data":%s}' % (MESSAGE % i))
    pipeline.wait()
    if pipeline.refused:
        raise RuntimeError(f"{pipeline.refused} publishes refused")
    pipeline.close()


def engine_wait(port: int, n: int) -> None:
    link = EngineLink(port)
    for i in range(n):
        link.publish("notice", [MESSAGE % i], ack=True)
    link.close()


def engine_pipe(port: int, n: int) -> None:
    link = EngineLink(port)
    for i in range(n):
        link.publish("notice", [MESSAGE % i], ack=i == n - 1)
    link.close()


RUN: dict[str, Callable[[int, int], None]] = {
    "http-wait": http_wait, "http-pipe": http_pipe,
    "engine-wait": engine_wait, "engine-pipe": engine_pipe,
}  # fmt: skip


def settle(pid: int) -> None:
    """Until the server spends no more CPU (the last deliveries flushed)."""
    last = proc_cpu_seconds(pid)
    while True:
        time.sleep(0.1)
        now = proc_cpu_seconds(pid)
        if now == last:
            return
        last = now


def measure(case: str, server: int, ports: tuple[int, int, int], n: int, subs: int) -> float:
    """Server CPU µs per publish."""
    http, ws, tcp = ports
    subscribers = Subscribers(ws, subs) if subs else None
    settle(server)
    before = proc_cpu_seconds(server)
    RUN[case](http if case.startswith("http") else tcp, n)
    if subscribers is not None:
        subscribers.wait(n - 1)
    settle(server)
    used = proc_cpu_seconds(server) - before
    if subscribers is not None:
        subscribers.close()
        if subscribers.resyncs:
            print(f"# {case}: the counting subscriber lagged: {subscribers.resyncs} resync "
                  "notice(s)", file=sys.stderr)  # fmt: skip
    return used / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--subscribers", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    results: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="bench-publish-"))
        server, http, ws, tcp = start_server(tmp, any(c.startswith("engine") for c in args.cases))
        try:
            cases = args.cases if round_ % 2 == 0 else args.cases[::-1]  # alternate the order
            for subs in args.subscribers:
                for case in cases:
                    us = measure(case, server.pid, (http, ws, tcp), args.publishes, subs)
                    results.setdefault((case, subs), []).append(us)
                    print(f"# round {round_ + 1}: {case} {subs} subscribers: {us:.0f} µs",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(10)
            log = (tmp / "stderr.log").read_text()
            if '"level":"error"' in log:
                print(log[-3000:], file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"| case | subscribers | server CPU µs per publish (median of {args.rounds}) | runs |")
    print("|---|---|---|---|")
    for (case, subs), values in results.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {case} | {subs} | {statistics.median(values):.0f} | {runs} |")


if __name__ == "__main__":
    main()
