#!/usr/bin/env python3
"""One flush round without the event loop: what the hub and the writer cost per connection.

    .venv/bin/python scripts/bench_flush.py                        # null sockets, 1,000 conns
    .venv/bin/python scripts/bench_flush.py --sock pair --burst 6  # real socketpairs
    .venv/bin/python scripts/bench_flush.py --clock cpu             # on a shared machine
    cd /tmp && <tree>/.venv/bin/python <this>/scripts/bench_flush.py   # another tree's pushd

A round is what the broadcast scenario's bursts do: ``--burst`` publishes on one channel with
``--conns`` subscribers (``Hub.publish``), then the flusher's loop over the dirty list
(``Hub.take_dirty`` and the writer's per-connection ``_flush``: the checks, the write, the
``written`` hook) -- the same code the flusher runs, without Trio around it. Sockets are
either null (``send`` is ``len``: every byte taken at once, so the Python around ``send`` is
all that is measured) or real ``socketpair``s, read empty after each round (untimed).

It imports the ``pushd`` of the interpreter that runs it (not this checkout's), so the same
script measures another tree: run it from a directory that is not a checkout with that
tree's ``.venv/bin/python``. It knows the writer of issue 20 (``pushd.gateway.writer``) and
the one before it (``Gateway._flush`` in ``pushd.gateway.server``, d4ef5ca).

Printed: nanoseconds per connection per round for the publish part and the flush part,
median of ``--repeat`` batches of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from pushd.channels import Channel
from pushd.gateway.hub import Hub

CHANNEL = Channel("trades_BTCUSDT", "BTCUSDT@trades", private=False, symbol="BTCUSDT")
LIMIT = 256 * 1024  # limits.outbound_buffer_bytes' default


class NullSock:
    """A socket whose kernel takes every byte at once."""

    __slots__ = ()
    send = staticmethod(len)


class Nursery:
    """Where a drain would start (never, with sockets that take everything)."""

    class cancel_scope:  # stands in for an attribute
        cancel_called = False

    @staticmethod
    def start_soon(*_args: object) -> None:
        raise AssertionError("a drain started: the socket did not take everything")


def fail(*_args: object) -> None:
    raise AssertionError("a connection ended")


def flusher_loop(hub: Hub, flush: Callable[[Any], None], *, owned: bool) -> Callable[[], int]:
    """The flusher's loop over one round's dirty list, without its clock (``owned``: issue
    20's, whose dirty list holds outlets that have a connection; before, they were one)."""

    def round_() -> int:
        dirty, hub.dirty = hub.dirty, []  # (``Hub.take_dirty``, which d4ef5ca has not)
        for n, outlet in enumerate(dirty, 1):
            conn = outlet.owner if owned else outlet
            try:
                flush(conn)
            except Exception:
                fail(conn)
            if not n % 64:
                pass
        return len(dirty)

    return round_


def new_writer(hub: Hub, socks: list[Any]) -> tuple[Callable[[], int], list[Any]]:
    """Issue 20's writer: ``Flusher._flush`` on ``Connection``s that have an outlet."""
    from prometheus_client import CollectorRegistry

    from pushd.config import LimitsConfig
    from pushd.gateway.connection import Connection, Traffic
    from pushd.gateway.writer import Flusher
    from pushd.metrics import GatewayMetrics

    # built whole (a class compiled with mypyc takes no attributes set past its constructor);
    # ``_flush`` reads the hub and the two callbacks, not the limits or the metrics
    flusher = Flusher(hub, LimitsConfig(), GatewayMetrics(CollectorRegistry()), fail, fail)
    hub.on_dirty = lambda: None  # no flusher task to wake
    traffic = Traffic()
    conns = []
    for n, sock in enumerate(socks):
        conn = Connection(sock, "127.0.0.1", f"127.0.0.1:{n}", n, LIMIT, hub, traffic)
        conn.life.opened()
        conn.nursery = Nursery()  # type: ignore[assignment]
        hub.subscribe(conn.outlet, CHANNEL)
        conns.append(conn)
    return flusher_loop(hub, flusher._flush, owned=True), conns


def old_writer(hub: Hub, socks: list[Any]) -> tuple[Callable[[], int], list[Any]]:
    """d4ef5ca's writer: ``Gateway._flush`` on ``Connection``s that are outlets."""
    from pushd.gateway import server

    gateway = server.Gateway.__new__(server.Gateway)
    gateway.hub, gateway.bytes_sent = hub, 0  # type: ignore[attr-defined]
    gateway._fail = fail  # type: ignore[method-assign]
    conns = []
    for n, sock in enumerate(socks):
        conn = server.Connection(sock, "127.0.0.1", f"127.0.0.1:{n}", n, LIMIT)  # type: ignore[call-arg]
        conn.phase = server.Phase.OPEN  # type: ignore[attr-defined]
        conn.nursery = Nursery()  # type: ignore[assignment]
        hub.subscribe(conn, CHANNEL)
        conns.append(conn)
    return flusher_loop(hub, gateway._flush, owned=False), conns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=6, help="publishes per round")
    parser.add_argument("--size", type=int, default=100, help="message bytes")
    parser.add_argument("--rounds", type=int, default=200, help="rounds per batch")
    parser.add_argument("--repeat", type=int, default=7, help="batches; the median is printed")
    parser.add_argument("--sock", choices=("null", "pair"), default="null")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: this process's CPU time (a shared machine: time spent descheduled is not "
        "counted)",
    )  # fmt: skip
    parser.add_argument(
        "--cold", type=int, default=0, metavar="MIB",
        help="write this many MiB between rounds (untimed), so each round starts with cold "
        "caches, as a round does in the server after the HTTP requests that fed it",
    )  # fmt: skip
    args = parser.parse_args()

    pairs = [socket.socketpair() for _ in range(args.conns)] if args.sock == "pair" else []
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    socks: list[Any] = [a for a, _ in pairs] or [NullSock()] * args.conns

    hub = Hub()
    new = importlib.util.find_spec("pushd.gateway.writer") is not None
    round_, _conns = (new_writer if new else old_writer)(hub, socks)
    hub.dirty.clear()
    data = msgspec.Raw(b'{"p":"' + b"x" * max(0, args.size - 8) + b'"}')

    def read_all() -> None:
        for _, b in pairs:
            try:
                while b.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass

    publish = hub.publish
    clock = time.process_time_ns if args.clock == "cpu" else time.perf_counter_ns
    evict = bytearray(args.cold << 20)
    pub_ns: list[float] = []
    flush_ns: list[float] = []
    seq = 0
    gc.disable()
    for _ in range(args.repeat):
        pub = fl = 0
        for _ in range(args.rounds):
            t0 = clock()
            for _ in range(args.burst):
                seq += 1
                publish(CHANNEL.internal, "e", seq, data)
            t1 = clock()
            flushed = round_()
            t2 = clock()
            assert flushed == args.conns, flushed
            pub += t1 - t0
            fl += t2 - t1
            read_all()
            if evict:
                evict[::64] = bytes(len(evict[::64]))  # one byte per cache line
        per = args.rounds * args.conns
        pub_ns.append(pub / per)
        flush_ns.append(fl / per)
    gc.enable()
    print(
        f"{'issue-20 writer' if new else 'd4ef5ca writer'}: {args.conns} conns, "
        f"burst {args.burst}, {args.sock} sockets; {args.clock} ns per connection per round, "
        f"median of {args.repeat}x{args.rounds} rounds: "
        f"publish {statistics.median(pub_ns):.0f} ({statistics.median(pub_ns) / args.burst:.0f}"
        f" per frame), flush {statistics.median(flush_ns):.0f} "
        f"(min {min(flush_ns):.0f}, max {max(flush_ns):.0f})"
    )


if __name__ == "__main__":
    main()
