"""Shared fixtures: a real daemon on free loopback ports, and real WebSocket/HTTP clients."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio_websocket

from pushd import config as config_mod
from pushd.auth import issue_hmac_token
from pushd.daemon import Daemon, Ports

SECRET = "test-secret"
PUBLISH_TOKEN = "test-publish-token"


def make_config(**sections: dict[str, Any]) -> config_mod.Config:
    raw: dict[str, Any] = {
        "websocket": {"port": 0},
        "http": {"port": 0, "publish_token": PUBLISH_TOKEN},
        "auth": {"hmac": {"secret": SECRET}},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_mod.from_dict(raw)


class Running:
    """A daemon under test and the ways to talk to it."""

    def __init__(self, daemon: Daemon, ports: Ports) -> None:
        self.daemon = daemon
        self.ports = ports
        self.ws_url = f"ws://127.0.0.1:{ports.websocket}/ws"
        self.http_url = f"http://127.0.0.1:{ports.http}"

    def token(self, uid: str) -> str:
        return issue_hmac_token(SECRET, uid, 60)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
