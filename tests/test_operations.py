"""Starting and stopping as an operator sees it: one clear line on failure, a clean shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import RawClient, make_config, start_daemon
from wsproto.events import AcceptConnection, RejectConnection

from pushd.auth import HmacVerifier
from pushd.config import HmacAuthConfig
from pushd.errors import CloseCode

PUSHD = [sys.executable, "-m", "pushd"]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pushd.toml"
    path.write_text(text)
    return path


def run_pushd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PUSHD, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize("service", ["websocket", "http", "ingest"])
def test_port_in_use_is_one_line(tmp_path: Path, service: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"websocket": 0, "http": 0, "ingest": 0} | {service: port}
        config = write_config(tmp_path, (
            f"[websocket]\nport = {ports['websocket']}\n[http]\nport = {ports['http']}\n"
            "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
            f"udp_enabled = false\ntcp_port = {ports['ingest']}\n"
            "[engine]\nsnapshot_enabled = false\n[auth.hmac]\nsecret = 's'\n"
            "[log]\nformat = 'json'\nlevel = 'error'\n"
        ))  # fmt: skip
        result = run_pushd("run", "--config", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "in use" in lines[0]


def test_run_refuses_an_empty_secret(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[auth.hmac]\nsecret = ''\n")
    result = run_pushd("run", "--config", str(config))
    assert result.returncode == 2
    assert "auth.hmac.secret" in result.stderr and "Traceback" not in result.stderr


def test_demo_uses_the_configured_secret_and_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, (
        "[websocket]\nport = 0\n[http]\nport = 0\npublish_token = 'my-token'\n"
        "[ingest]\nudp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_port = 0\n"
        "[auth.hmac]\nsecret = 'my-secret'\n[log]\nformat = 'json'\nlevel = 'error'\n"
        "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"  # a demo serves both
    ))  # fmt: skip
    proc = subprocess.Popen(
        [*PUSHD, "demo", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        printed = ""
        for line in proc.stdout:
            printed += line
            if "demo login" in line:
                break
        token = printed.split('"token":"', 1)[1].split('"', 1)[0]
        verifier = HmacVerifier(HmacAuthConfig(secret="my-secret"))
        assert trio.run(verifier.verify, token).uid == "1001"
        assert "publish token my-token" in printed
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def test_shutdown_closes_the_listener_first_and_answers_handshakes(
    nursery: trio.Nursery,
) -> None:
    running = await start_daemon(nursery, make_config(limits={"close_timeout_s": 30.0}))
    port = running.ports.websocket
    # a handshake in flight: connected, request not yet complete
    in_flight = await trio.open_tcp_stream("127.0.0.1", port)
    await in_flight.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    # a client that will not answer our close frame keeps the grace period going; it is
    # accepted after the one above (one accept loop, in order), so both are in by now
    lingering = await RawClient.connect(port)
    assert isinstance(await lingering.handshake(), AcceptConnection)
    running.daemon.stop()
    _, code = await lingering.read_one_batch()
    assert code == CloseCode.GOING_AWAY  # the shutdown has begun
    with pytest.raises(OSError):  # the listener is closed: refused at once, not left waiting
        await trio.open_tcp_stream("127.0.0.1", port)
    await in_flight.send_all(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    answer = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in answer:
            answer += await in_flight.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 503")
    await in_flight.aclose()
    await lingering.aclose()
    with trio.fail_after(10):
        await running.daemon.stopped.wait()


async def handshake_status(port: int) -> int:
    client = await RawClient.connect(port)
    answer = await client.handshake()
    await client.aclose()
    return 101 if isinstance(answer, AcceptConnection) else answer.status_code  # type: ignore[union-attr]


async def test_connections_per_ip_are_limited(nursery: trio.Nursery) -> None:
    running = await start_daemon(nursery, make_config(websocket={"max_connections_per_ip": 2}))
    port = running.ports.websocket
    clients, answers = [], []
    for _ in range(3):
        clients.append(await RawClient.connect(port))
        answers.append(await clients[-1].handshake())
    assert [type(a) for a in answers[:2]] == [AcceptConnection] * 2
    assert isinstance(answers[2], RejectConnection) and answers[2].status_code == 429
    for c in clients:
        await c.aclose()
    await running.daemon.gateway.wait_idle()
    assert await handshake_status(port) == 101  # the address's count went down again


async def test_handshake_rate_is_limited(nursery: trio.Nursery) -> None:
    running = await start_daemon(nursery, make_config(websocket={"handshakes_per_second": 0.01}))
    port = running.ports.websocket
    assert [await handshake_status(port) for _ in range(3)] == [101, 503, 503]
