"""Shared fixtures: a real daemon on free loopback ports, and real WebSocket/HTTP clients."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
import trio
import trio_websocket

if TYPE_CHECKING:
    import redis_servers
from ports import free_port as free_port
from ports import free_port_block as free_port_block
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, TextMessage
from wsproto.events import Event as WsEvent
from wsproto.events import Request as WsRequest

from ingest import wire
from ingest.sim import Market
from ingest.sim_engine import run_feed
from ingest.transport import BookProvider, serve_snapshots
from pushd import config as config_mod
from pushd.auth import issue_hmac_token
from pushd.daemon import Daemon, Ports

SECRET = "test-secret"
PUBLISH_TOKEN = "test-publish-token"
INGEST_KEY = "test-ingest-key-of-source-100-for-tests"  # sealed frames of source 100


def make_config(role: str = "all", **sections: dict[str, Any]) -> config_mod.Config:
    raw: dict[str, Any] = {
        "role": role,
        "websocket": {"port": 0},
        # the tests stand in for the market side through the publish API (off by default)
        "http": {"port": 0, "publish_token": PUBLISH_TOKEN, "allow_market_publish": True},
        "auth": {"hmac": {"secret": SECRET}},
        # most tests send unsealed frames (tests/test_ingest_auth.py: sealed ones only)
        "ingest": {
            "udp_port": 0,
            "tcp_port": 0,
            "allow_unauthenticated": True,
            "sources": [{"id": 100, "key": INGEST_KEY, "private": True, "silent_after_s": 0}],
        },
        "engine": {"snapshot_enabled": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_mod.from_dict(raw)


def order(uid: str, order_id: int, status: str = "new") -> wire.OrderUpdate:
    return wire.OrderUpdate(
        uid=uid, symbol="BTCUSDT", order_id=order_id, side="buy", kind="limit",
        price="65000.1", qty="0.010", filled_qty="0", avg_price="0", status=status,  # type: ignore[arg-type]
        ts=1_700_000_000_000,
    )  # fmt: skip


def trade(trade_id: int) -> wire.Trade:
    return wire.Trade("BTCUSDT", trade_id, "65000.1", "0.001", "buy", 1_700_000_000_000)


class Running:
    """A daemon under test and the ways to talk to it."""

    def __init__(self, daemon: Daemon, ports: Ports) -> None:
        self.daemon = daemon
        self.ports = ports
        self.ws_url = f"ws://127.0.0.1:{ports.websocket}/ws"
        self.http_url = f"http://127.0.0.1:{ports.http}"

    def token(self, uid: str) -> str:
        return issue_hmac_token(SECRET, uid, 3600)  # far from exp: no @auth notice in tests

    @property
    def epoch(self) -> str:
        """The epoch of every channel of this daemon's memory bus."""
        return self.daemon.bus.epoch

    async def publish(self, channel: str, data: Any) -> int:
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{self.http_url}/v1/publish",
                json={"channel": channel, "data": data},
                headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
            )
        assert r.status_code == 200, r.text
        seq: int = r.json()["seq"]
        return seq

    async def publish_batch(self, messages: list[dict[str, Any]]) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(
                f"{self.http_url}/v1/publish/batch",
                json={"messages": messages},
                headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
            )
        assert r.status_code == 200, r.text
        seqs: list[int] = r.json()["seqs"]
        return seqs


async def start_daemon(nursery: trio.Nursery, config: config_mod.Config) -> Running:
    daemon = Daemon(config)
    ports: Ports = await nursery.start(daemon.serve)
    return Running(daemon, ports)


async def start_simulated(
    nursery: trio.Nursery, market: Market, provider: BookProvider | None = None
) -> Running:
    """A daemon polling ``market``'s books (through ``provider``, if given) on a free port."""
    snapshot_port = await nursery.start(serve_snapshots, provider or market.book, "127.0.0.1", 0)
    config = make_config(engine={"snapshot_enabled": True, "snapshot_port": snapshot_port})
    return await start_daemon(nursery, config)


def feed(running: Running, market: Market) -> Callable[[], Awaitable[None]]:
    """The simulated engine's event feed into ``running`` (UDP and TCP), to start in a nursery."""
    ports = running.ports
    return functools.partial(
        run_feed, market, host="127.0.0.1", tcp_port=ports.ingest_tcp, udp_port=ports.ingest_udp,
        step_ms=20,
    )  # fmt: skip


def start_feed(nursery: trio.Nursery, running: Running, market: Market) -> trio.CancelScope:
    """``feed`` started in ``nursery``; cancel the scope returned to stop it."""
    feeding = trio.CancelScope()

    async def run() -> None:
        with feeding:
            await feed(running, market)()

    nursery.start_soon(run)
    return feeding


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[Running]:
    yield await start_daemon(nursery, make_config())


class Client:
    """A trio-websocket client speaking the JSON protocol."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(msgspec.json.encode(obj).decode())

    async def recv(self) -> Any:
        with trio.fail_after(5):
            return msgspec.json.decode(await self.ws.get_message())

    async def call(self, obj: Any) -> Any:
        await self.send(obj)
        return await self.recv()


@asynccontextmanager
async def open_client(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    async with trio_websocket.open_websocket_url(url, **kwargs) as ws:
        yield Client(ws)


def subscribed(reply: Any, *channels: str) -> bool:
    """A subscribe reply that names exactly ``channels``, each with an epoch and a seq."""
    streams = reply.get("streams", {}) if isinstance(reply, dict) else {}
    return (
        reply.get("result") is True
        and set(streams) == set(channels)
        and all(isinstance(s.get("epoch"), str) and s.get("seq", -1) >= 0 for s in streams.values())
    )


class RawClient:
    """A WebSocket client over a bare socket (wsproto), for clients that misbehave on purpose:
    never read, send garbage, or have a tiny receive buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._parts: list[str] = []

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, path: str = "/ws",
                      headers: list[tuple[bytes, bytes]] | None = None) -> RawClient:  # fmt: skip
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        await client.stream.send_all(
            client.ws.send(WsRequest(host="localhost", target=path, extra_headers=headers or []))
        )
        return client

    async def handshake(self) -> WsEvent:
        """The server's answer: AcceptConnection or RejectConnection."""
        with trio.fail_after(5):
            while True:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection | RejectConnection):
                        return event

    async def send_json(self, obj: Any) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(msgspec.json.encode(obj).decode())))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_one_batch(self) -> tuple[list[Any], int | None]:
        """The JSON messages of one receive (a close code, if a close frame came)."""
        with trio.fail_after(30):
            data = await self.stream.receive_some(1 << 20)
        self.ws.receive_data(data or None)
        messages: list[Any] = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    messages.append(msgspec.json.decode("".join(self._parts)))
                    self._parts.clear()
            elif isinstance(event, CloseConnection):
                return messages, event.code
        return messages, None

    async def read_until_close(self) -> tuple[list[Any], int | None]:
        """Every JSON message until the server's close frame (its code) or EOF (None)."""
        messages: list[Any] = []
        parts: list[str] = []
        with trio.fail_after(30):
            while True:
                data = await self.stream.receive_some(1 << 20)
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            messages.append(msgspec.json.decode("".join(parts)))
                            parts.clear()
                    elif isinstance(event, CloseConnection):
                        return messages, (event.code if data else None)
                if not data:
                    return messages, None

    async def aclose(self) -> None:
        await self.stream.aclose()


class Logs:
    """The JSON log lines of a ``pushd`` process (and its children), read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.lines: list[dict[str, Any]] = []

    async def until(self, event: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            return [line for line in self.lines if line.get("event") == event
                    and all(line.get(k) == v for k, v in fields.items())]  # fmt: skip

        while len(matching()) < count:
            chunk = await self._stream.receive_some()
            assert chunk, f"pushd ended before {count} x {event!r}: {self.lines[-5:]}"
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            for raw in complete:
                if raw.startswith(b"{"):
                    self.lines.append(json.loads(raw))  # whole lines, even from 3 processes
        return matching()


def ready_ports(logs: Logs, index: int = 0) -> Ports:
    """The ports a ``pushd`` process bound, from its ``index``-th "pushd ready" line (start it
    with port 0 everywhere: the kernel picks free ports, no check-then-bind race)."""
    line = [line for line in logs.lines if line.get("event") == "pushd ready"][index]
    return Ports(**{field: line[field] for field in Ports.__struct_fields__})


@asynccontextmanager
async def pushd_process(
    command: list[str], ready: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[trio.Process, Logs]]:
    """A ``pushd`` command (``format = 'json'`` logs) once ``ready`` processes said
    "pushd ready"; killed on the way out if it is still running."""
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        assert process.stderr is not None
        logs = Logs(process.stderr)
        with trio.move_on_after(30) as waited:
            await logs.until("pushd ready", ready)
        if waited.cancelled_caught:  # say why: the last lines, errors first
            errors = [line for line in logs.lines if line.get("level") in ("error", "warning")]
            raise AssertionError(f"not {ready} x 'pushd ready' in 30 s: {errors[-5:]} "
                                 f"{logs.lines[-5:]}")  # fmt: skip
        yield process, logs
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.fixture(params=["redis", "redis-cluster"])
def redis(request: pytest.FixtureRequest) -> Iterator[redis_servers.Redis]:
    """One Redis and a 3-node Redis Cluster (sharded pub/sub): a test asking for ``redis`` runs
    on both (test modules that want a single server define their own ``redis``)."""
    import redis_servers  # it imports this module: not at the top

    server = (
        redis_servers.RedisServer() if request.param == "redis" else redis_servers.RedisCluster()
    )
    with server:
        yield server
