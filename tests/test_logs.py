"""The log an operator greps: one JSON object per line with ``event``, ``level`` and
``timestamp``; the ids that matter on the lines about a connection, a login or an engine peer;
a flood of bad input is a few lines with a count, not a line per datagram."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from conftest import SECRET, open_client

from pushd.auth import issue_hmac_token

IDS = {  # event -> the fields every line of it must carry
    "connection open": {"conn_id", "peer"},
    "connection closed": {"conn_id", "peer", "reason", "uid"},
    "login": {"conn_id", "uid"},
    "login failed": {"conn_id", "peer", "error"},
    "bad UDP datagram dropped": {"peer", "suppressed"},
    "pushd ready": {"websocket", "http"},
}


async def test_every_line_has_its_shape(tmp_path: Path) -> None:
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = '{SECRET}'\n"
        "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
        "udp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_enabled = false\n"
        "[log]\nformat = 'json'\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pushd", "run", "--config", str(config)],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stderr is not None
    text = b""
    with trio.fail_after(30):
        while b'"pushd ready"' not in text:
            text += await process.stderr.receive_some()
    (ready,) = [json.loads(line) for line in text.splitlines() if b'"pushd ready"' in line]
    ws, udp = ready["websocket"], ready["ingest_udp"]  # the ports the kernel picked
    async with open_client(f"ws://127.0.0.1:{ws}/ws") as client:
        await client.call({"op": "auth", "token": "forged"})
        await client.call({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 60)})
        await client.call({"op": "subscribe", "channel": ["@order", "BTCUSDT@trades"]})
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(500):  # a flood of garbage from one engine peer
                await sock.sendto(b"\xff not an engine frame", ("127.0.0.1", udp))
        assert (await client.call({"op": "ping"}))["op"] == "pong"
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        while chunk := await process.stderr.receive_some():
            text += chunk
        assert await process.wait() == 0
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"event", "level", "timestamp"} <= line.keys(), line
        assert line["level"] in {"debug", "info", "warning", "error"}
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() is not None  # UTC, ISO
        assert IDS.get(line["event"], set()) <= line.keys(), line
    events = [line["event"] for line in lines]
    for event in IDS:
        assert event in events, f"no {event!r} line: {events}"
    floods = [line for line in lines if line["event"] == "bad UDP datagram dropped"]
    # 500 bad datagrams: a line a second at most, each counting what it held back
    assert len(floods) <= 5 and sum(line["suppressed"] for line in floods) + len(floods) <= 500
    assert events[-1] == "stopped"
