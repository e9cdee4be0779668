"""The "pushd ready" log line names the ports a process bound: a daemon configured with port 0
everywhere (the kernel picks) is found from it, so tests and scripts never guess a free port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import trio
from conftest import SECRET, open_client, pushd_process, ready_ports

ALL_PORTS_0 = (
    "[websocket]\nport = 0\n[http]\nport = 0\n"
    "[ingest]\nallow_unauthenticated = true\nudp_port = 0\ntcp_port = 0\n"
    "[log]\nformat = 'json'\n"
    "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"  # a demo serves both
)


async def test_pushd_run_names_the_ports_it_bound(tmp_path: Path) -> None:
    config = tmp_path / "pushd.toml"
    config.write_text(
        ALL_PORTS_0 + f"[auth.hmac]\nsecret = '{SECRET}'\n[engine]\nsnapshot_enabled = false\n"
    )
    command = [sys.executable, "-m", "pushd", "run", "--config", str(config)]
    async with pushd_process(command) as (_, logs):
        ports = ready_ports(logs)
        assert 0 not in (ports.websocket, ports.http, ports.ingest_udp, ports.ingest_tcp)
        async with open_client(f"ws://127.0.0.1:{ports.websocket}/ws") as client:
            assert (await client.call({"op": "ping"}))["op"] == "pong"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{ports.http}/healthz")).status_code == 200
        with socket.create_connection(("127.0.0.1", ports.ingest_tcp)):
            pass


async def test_pushd_demo_polls_the_snapshot_port_its_engine_bound(tmp_path: Path) -> None:
    """``engine.snapshot_port = 0`` in a demo: the simulated engine binds a free port and the
    daemon polls that one (it connects, and a depth subscriber gets a book)."""
    config = tmp_path / "demo.toml"
    config.write_text(ALL_PORTS_0 + "[engine]\nsnapshot_port = 0\n")
    command = [sys.executable, "-m", "pushd", "demo", "--config", str(config), "--history-h", "0"]
    async with pushd_process(command) as (_, logs):
        with trio.fail_after(20):
            await logs.until("engine snapshot server connected")
        async with open_client(f"ws://127.0.0.1:{ready_ports(logs).websocket}/ws") as client:
            await client.send({"op": "subscribe", "channel": "BTCUSDT@depth"})
            with trio.fail_after(20):
                while "event" not in (message := await client.recv()):
                    pass
            assert message["event"] == "BTCUSDT@depth" and message["data"]["bids"]
        assert not [line for line in logs.lines
                    if line["event"] == "engine snapshot server unreachable"]  # fmt: skip
