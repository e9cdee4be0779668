"""systemd's notify protocol against a real ``NOTIFY_SOCKET`` the test opens: READY only once
every listener is bound, WATCHDOG pings from the loop, STOPPING when the drain begins."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import trio
from conftest import SECRET, pushd_process, ready_ports

from pushd.notify import Notifier, message


def test_without_a_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.send(READY=1)  # no socket: a no-op, not an error
    assert message(READY=1, STATUS="a b") == b"READY=1\nSTATUS=a b"


def test_the_watchdog_is_for_this_process_only() -> None:
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 2.0  # half of WatchdogSec
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_interval_s is None


async def test_ready_watchdog_and_stopping_on_a_real_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        await listener.bind(str(path))
        config = tmp_path / "pushd.toml"
        config.write_text(
            f"[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = '{SECRET}'\n"
            "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
            "udp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_enabled = false\n"
            "[log]\nformat = 'json'\n"
        )
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        command = [sys.executable, "-m", "pushd", "run", "--config", str(config)]
        async with pushd_process(command, env=env) as (process, logs):
            with trio.fail_after(30):
                first = (await listener.recv(4096)).decode().split("\n")
                assert first[0] == "READY=1" and first[1].startswith("STATUS=0 connections")
                ws = ready_ports(logs).websocket  # bound before READY was sent
                with socket.create_connection(("127.0.0.1", ws)):
                    pass
                pings = 0
                while pings < 3:  # every 0.1 s (half of 0.2 s), from the event loop
                    got = (await listener.recv(4096)).decode()
                    assert got.startswith("WATCHDOG=1\nSTATUS="), got
                    pings += 1
                process.send_signal(signal.SIGTERM)
                while not (got := (await listener.recv(4096)).decode()).startswith("STOPPING=1"):
                    assert got.startswith("WATCHDOG=1"), got
                assert await process.wait() == 0
