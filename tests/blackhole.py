"""A TCP proxy in front of a real server that can black-hole its links (issue 19, item 3).

``cut()`` stops forwarding, both ways, on every connection and on those made later (or only
on those of one client: its name, sent by ``CLIENT SETNAME``, in their first bytes), and closes
nothing: each end believes its connection is open and hears nothing, as across a network that
drops every packet (a half-open link). ``heal()`` lets everything held through, as TCP's
retransmissions would. A connection one end closes is closed at the other once bytes flow.

For a Redis Cluster (``proxied``), each node is told to announce its proxy's port to clients
(``cluster-announce-port``), so a client that follows the cluster's layout and redirections
reaches every node through its proxy, while the nodes gossip among themselves directly.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import trio
from redis_servers import REDIS_CLI, Redis, RedisCluster, RedisServer

CHUNK = 1 << 16
HEAD = 4096  # bytes of a connection's start kept to tell whose it is (CLIENT SETNAME)


class _Connection:
    __slots__ = ("cut", "forwarded", "head", "sockets")

    def __init__(self) -> None:
        self.head = b""  # what the client sent first
        self.cut = False  # black-holed on its own (``cut_open``)
        self.forwarded = 0  # bytes, both ways
        self.sockets: list[trio.SocketStream] = []


class Blackhole:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0  # known once started
        self._cut: bytes | None = None  # cut connections whose start has it (b"": all)
        self._changed = trio.Event()
        self._open: set[_Connection] = set()
        self.connections = 0  # accepted so far
        self._reset: tuple[bytes, int] | None = None  # (whose, after so many bytes)
        self._slow: tuple[bytes, float] | None = None  # (whose, bytes a second)
        self.resets = 0  # connections reset so far
        self.reset_done = trio.Event()  # set (and replaced) at each reset

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cut(self, whose: bytes = b"") -> None:
        """Stop forwarding, both ways, closing nothing: on every connection, or on those
        whose first bytes contain ``whose`` (a client's name), now and later."""
        self._cut = whose
        self._wake()

    def cut_open(self, whose: bytes) -> int:
        """Black-hole the connections open now whose first bytes contain ``whose``; new ones
        flow (a NAT or firewall that forgot its flows). How many were cut."""
        cut = [c for c in self._open if whose in c.head]
        for connection in cut:
            connection.cut = True
        self._wake()
        return len(cut)

    def reset(self, whose: bytes = b"", after: int = 0) -> None:
        """Reset (TCP RST, both ends) every connection whose first bytes contain ``whose``
        once it has forwarded ``after`` bytes, both ways: those open now and those made
        later, until ``heal()``; ``after`` small enough to reset in the middle of the
        handshake, larger for a subscribe, a PING, a read."""
        self._reset = (whose, after)
        for connection in list(self._open):
            self._check_reset(connection)

    def throttle(self, whose: bytes, rate: float) -> None:
        """Forward at most ``rate`` bytes a second on each connection whose first bytes
        contain ``whose`` (a slow network, or a subscriber behind a backlog: bytes keep
        coming, a reply waits behind them), until ``heal()``."""
        self._slow = (whose, rate)

    async def _pace(self, connection: _Connection, size: int) -> None:
        if self._slow is not None and self._slow[0] in connection.head:
            await trio.sleep(size / self._slow[1])

    def _check_reset(self, connection: _Connection) -> None:
        if self._reset is None or not connection.sockets:
            return
        whose, after = self._reset
        if whose in connection.head and connection.forwarded >= after:
            self.resets += 1
            self.reset_done.set()
            self.reset_done = trio.Event()
            for stream in connection.sockets:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))  # fmt: skip
                stream.socket.close()  # (the pumps then fail: ClosedResourceError)
            connection.sockets = []

    def heal(self) -> None:
        self._cut = None
        self._reset = None
        self._slow = None
        for connection in self._open:
            connection.cut = False
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _flowing(self, connection: _Connection) -> None:
        while connection.cut or (self._cut is not None and self._cut in connection.head):
            await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        connection = _Connection()
        self._open.add(connection)
        try:
            await self._forward(connection, downstream)
        finally:
            self._open.discard(connection)

    async def _forward(self, connection: _Connection, downstream: trio.SocketStream) -> None:
        async with downstream:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            connection.sockets = [downstream, upstream]
            self._check_reset(connection)
            async with upstream, trio.open_nursery() as nursery:
                for source, sink in ((downstream, upstream), (upstream, downstream)):
                    nursery.start_soon(
                        self._pump, connection, source, sink, source is downstream,
                        nursery.cancel_scope,
                    )  # fmt: skip

    async def _pump(
        self, connection: _Connection, source: trio.SocketStream, sink: trio.SocketStream,
        from_client: bool, both: trio.CancelScope,
    ) -> None:  # fmt: skip
        """Forward ``source`` to ``sink`` while flowing; at an end (or an error), end both."""
        try:
            while True:
                await self._flowing(connection)  # while cut nothing is read: the kernel holds it
                data = await source.receive_some(CHUNK)
                if not data:
                    break
                if from_client and len(connection.head) < HEAD:
                    connection.head += data[:HEAD]
                await self._flowing(connection)  # a chunk read just before the cut waits too
                await self._pace(connection, len(data))
                await sink.send_all(data)
                connection.forwarded += len(data)
                self._check_reset(connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        both.cancel()


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout  # fmt: skip


async def proxied(nursery: trio.Nursery, redis: Redis) -> list[Blackhole]:
    """A black-holing proxy in front of each node of ``redis`` (the first one's ``url`` is the
    one to give pushd); a Cluster's nodes announce their proxies to clients."""
    servers = redis.nodes if isinstance(redis, RedisCluster) else [redis]
    proxies = [Blackhole(server.port) for server in servers]
    for proxy in proxies:
        await nursery.start(proxy.run)
    if isinstance(redis, RedisCluster):
        for server, proxy in zip(servers, proxies, strict=True):
            redis_cli(server.port, "CONFIG", "SET", "cluster-announce-bus-port",
                      str(server.port + 10000))  # fmt: skip
            redis_cli(server.port, "CONFIG", "SET", "cluster-announce-port", str(proxy.port))
        await announced(servers, {p.port for p in proxies})
    return proxies


async def announced(servers: list[RedisServer], ports: set[int]) -> None:
    """Until every node's view of the cluster names the proxies' ports (gossip has no event
    to await: polled)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = []
        for server in servers:
            table = redis_cli(server.port, "CLUSTER", "NODES")
            seen.append({int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                         for line in table.splitlines()})  # fmt: skip
        if all(s == ports for s in seen):
            return
        await trio.sleep(0.1)
    raise RuntimeError(f"the cluster does not announce the proxies: {seen} != {ports}")
