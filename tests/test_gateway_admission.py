"""Issue 20's two pinned bugs: a reload's limits hold for what comes next (the connection cap,
the message size), and a close never makes the publish->flush histogram lie."""

from __future__ import annotations

import errno
import time

import msgspec
import trio
from conftest import RawClient, Running, make_config, start_daemon
from wsproto.events import AcceptConnection, Request, TextMessage

from pushd import config as config_mod
from pushd.gateway import admission
from pushd.gateway.admission import AcceptError, Admission


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


def request(target: str = "/ws", origin: bytes | None = None) -> Request:
    headers = [(b"origin", origin)] if origin is not None else []
    return Request(host="localhost", target=target, extra_headers=headers)


def test_admission_reads_the_current_limits_on_every_socket_and_request() -> None:
    ws = make_config(websocket={"max_connections": 2, "max_connections_per_ip": 1}).websocket
    gate = Admission(ws)
    assert [gate.take_socket("10.0.0.1") for _ in range(2 + 16)] == [None] * 17 + [
        "per_ip_flood"
    ]  # 1 + PER_IP_FLOOD sockets from one address are still answered
    assert gate.refusal(request(), "10.0.0.1", 0, False, 0.0) == admission.PER_IP
    assert gate.refusal(request(), "10.0.0.2", 2, False, 0.0) == admission.CAPACITY
    gate.reconfigure(msgspec.structs.replace(ws, max_connections=500, max_connections_per_ip=50))
    assert gate.refusal(request(), "10.0.0.1", 2, False, 0.0) is None
    assert gate.take_socket("10.0.0.1") is None
    for _ in range(18):
        gate.release("10.0.0.1")
    assert gate.open_sockets == 0 and gate.per_ip == {}


def test_admission_refusals_in_order() -> None:
    ws = make_config(websocket={"allowed_origins": ["https://ok.example"]}).websocket
    gate = Admission(ws)
    assert gate.refusal(request(), "ip", 0, True, 0.0) == admission.SHUTTING_DOWN
    assert gate.refusal(request("/nope?x=1"), "ip", 0, False, 0.0) == admission.Refusal(
        404, "not_found", "no WebSocket at /nope"
    )
    assert gate.refusal(request(origin=b"https://evil.example"), "ip", 0, False, 0.0) == (
        admission.ORIGIN
    )
    assert gate.refusal(request(origin=b"https://ok.example"), "ip", 0, False, 0.0) is None


def test_accept_errors_fall_in_trios_classes() -> None:
    assert admission.accept_error(errno.ECONNABORTED) is AcceptError.GONE
    assert admission.accept_error(errno.EMFILE) is AcceptError.CAPACITY
    assert admission.accept_error(errno.EBADF) is AcceptError.CLOSED
    assert admission.accept_error(errno.EINVAL) is AcceptError.OTHER


async def test_a_wrong_websocket_version_is_answered_426_with_the_one_spoken(
    running: Running,
) -> None:
    """RFC 6455 section 4.4, as wsproto's event_hint suggests; a missing one stays 400."""
    for version, status in ((b"8", 426), (None, 400)):
        stream = await trio.open_tcp_stream("127.0.0.1", running.ports.websocket)
        head = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
        if version is not None:
            head += b"Sec-WebSocket-Version: " + version + b"\r\n"
        await stream.send_all(head + b"\r\n")
        answer = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 %d" % status), answer
        assert (b"sec-websocket-version: 13" in answer.lower()) is (status == 426)
        await stream.aclose()
