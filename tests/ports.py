"""Free loopback ports for servers that cannot bind port 0 themselves (check, then bind: a
small race, kept small by binding every port of a block at once): redis-server, and the
ports ``pushd run --workers`` shares between its children. A pushd process binds port 0 and
names the ports it got in its "pushd ready" line (``conftest.ready_ports``); the tests and
scripts read them there. ``scripts/`` import this module too (``benchlib``)."""

from __future__ import annotations

import contextlib
import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free loopback port (TCP, or UDP with ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback TCP ports, all bound at once while
    checked (``pushd run --workers`` serves gateway i's API on ``http.port + i``: a neighbour of
    an ephemeral port is often some other socket's)."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    probe = held.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports")
