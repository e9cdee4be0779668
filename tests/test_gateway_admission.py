"""Issue 20's two pinned bugs: a reload's limits hold for what comes next (the connection cap,
the message size), and a close never makes the publish->flush histogram lie."""

from __future__ import annotations

import time

import msgspec
import trio
from conftest import RawClient, Running, make_config, start_daemon
from wsproto.events import AcceptConnection, TextMessage

from pushd import config as config_mod


def raised(config: config_mod.Config, section: str, **values: object) -> config_mod.Config:
    raw = msgspec.to_builtins(config)
    raw[section].update(values)
    return config_mod.from_dict(raw)


async def reload_to(running: Running, config: config_mod.Config) -> None:
    daemon = running.daemon
    daemon.load_config = lambda: config
    assert await daemon.reload() is not None


async def test_a_reload_raising_max_connections_lets_them_all_in(nursery: trio.Nursery) -> None:
    running = await start_daemon(nursery, make_config(websocket={"max_connections": 2}))
    await reload_to(running, raised(running.daemon.config, "websocket", max_connections=500))
    clients = []
    try:
        for _ in range(80):
            raw = await RawClient.connect(running.ports.websocket)
            clients.append(raw)
            assert isinstance(await raw.handshake(), AcceptConnection)
        assert len(running.daemon.gateway.connections) == 80
        for raw in clients:  # each is served: a ping is answered
            await raw.send_json({"op": "ping", "id": 1})
            assert (await raw.read_one_batch())[0][0]["op"] == "pong"
    finally:
        for raw in clients:
            await raw.aclose()


async def test_a_reload_raising_max_message_bytes_holds_for_open_ones(
    nursery: trio.Nursery,
) -> None:
    running = await start_daemon(nursery, make_config(limits={"max_message_bytes": 4096}))
    raw = await RawClient.connect(running.ports.websocket)
    assert isinstance(await raw.handshake(), AcceptConnection)
    await reload_to(running, raised(running.daemon.config, "limits", max_message_bytes=65536))
    await raw.send_json({"op": "ping", "id": "x" * 8000})  # over the old limit, under the new
    messages: list[object] = []
    code = None
    while not messages and code is None:
        messages, code = await raw.read_one_batch()
    assert code is None, code  # answered, not closed with 1009
    await raw.aclose()


async def test_a_close_records_no_publish_to_flush_older_than_the_test(
    nursery: trio.Nursery,
) -> None:
    """A close queued while nothing else was ever queued: the flush round it wakes must not
    observe the time since the clock's origin."""
    began = time.perf_counter()
    running = await start_daemon(nursery, make_config(limits={"max_message_bytes": 1024}))
    raw = await RawClient.connect(running.ports.websocket)
    assert isinstance(await raw.handshake(), AcceptConnection)
    await raw.send_raw(raw.ws.send(TextMessage("x" * 2000)))  # too big: the server closes it
    _, code = await raw.read_until_close()
    assert code == 1009
    elapsed = time.perf_counter() - began
    registry = running.daemon.registry
    count = registry.get_sample_value("pushd_publish_to_flush_seconds_count")
    total = registry.get_sample_value("pushd_publish_to_flush_seconds_sum")
    assert count is not None and count >= 1  # the close frame went through a flush round
    assert total is not None and total <= elapsed, (total, elapsed)
    await raw.aclose()
