"""What a frame flood costs the other clients: a victim's round trip while flooders send.

    .venv/bin/python scripts/frame_flood.py --mode continuation --flooders 2 --seconds 5

Starts ``pushd run`` (default limits), measures a victim client's application-ping round trip
(``{"op":"ping"}`` -> ``{"op":"pong"}``) alone, then while ``--flooders`` processes each flood
one connection with ``--mode`` frames: ``continuation`` (a text frame with FIN unset, then
zero-length continuation frames), ``ping`` (WebSocket pings, their pongs read and thrown away),
or ``spin`` (no connection, only the CPU burnt: how much of the delay is the machine's). A
flooder that is closed connects again and floods again, as an attacker would. Prints one JSON
line: the victim's round trips (p50, p90, max, ms) alone and during the flood, its pings that
got no pong, the frames the flooders handed to their sockets, their connections and the close
codes they got, the server's CPU seconds during the flood, and its RSS before, right after and
3 s after the flood. Issue 18 (items 4 and 5) quotes its numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from benchlib import free_port, proc_cpu_seconds, proc_rss_kib, pushd_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # wsframes
from wsframes import ZERO_MASK, ServerFrames, client_frame, close_code, ws_connect


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    return client_frame(opcode, payload, fin=fin, mask_key=ZERO_MASK)


connect = ws_connect


class ServerAnswers:
    """The server's frames as they come (wsproto's decoder, ``wsframes.ServerFrames``); notes the
    code of a close frame."""

    def __init__(self) -> None:
        self._frames = ServerFrames()
        self.close_code: int | None = None
        self.eof = False

    def feed(self, data: bytes) -> None:
        for opcode, payload in self._frames.feed(data):
            if opcode == 8 and self.close_code is None:
                self.close_code = close_code(payload)
        self._frames.pending.clear()

    def read_ready(self, sock: socket.socket) -> None:
        """Whatever the socket has now, without waiting."""
        sock.setblocking(False)
        try:
            while chunk := sock.recv(1 << 20):
                self.feed(chunk)
            self.eof = True
        except BlockingIOError:
            pass
        except OSError:
            self.eof = True


def flood(port: int, mode: str, seconds: float, out: mp.Queue[dict[str, object]]) -> None:
    """Flood until ``seconds`` are up, reconnecting whenever the server ends the connection;
    ``spin`` only burns the CPU a flooder would (a control: the machine's share of the delay)."""
    if mode == "spin":
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        out.put({"frames_sent": 0, "connections": 0, "close_codes": {}})
        return
    batch = (frame(0, fin=False) if mode == "continuation" else frame(9, b"ping")) * 1000
    deadline = time.monotonic() + seconds
    sent = connections = 0
    codes: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            sock = connect(port)
        except OSError:
            continue
        connections += 1
        server = ServerAnswers()
        if mode == "continuation":
            sock.sendall(frame(1, b'{"op":', fin=False))
        try:
            while time.monotonic() < deadline and server.close_code is None and not server.eof:
                sock.settimeout(0.5)
                sock.sendall(batch)
                sent += 1000
                server.read_ready(sock)
        except OSError:  # the server stopped reading or reset: is its close frame there?
            sock.settimeout(1.0)
            try:
                while server.close_code is None and (chunk := sock.recv(1 << 20)):
                    server.feed(chunk)
            except OSError:
                pass
        codes[str(server.close_code)] = codes.get(str(server.close_code), 0) + 1
        sock.close()
    out.put({"frames_sent": sent, "connections": connections, "close_codes": codes})


def round_trips(port: int, seconds: float) -> tuple[list[float], int]:
    """Application pings for ``seconds``, one at a time, 15 per second (under the request
    limit); returns the round trips (ms) and how many pings got no pong within 5 s."""
    sock = connect(port)
    rtts: list[float] = []
    lost = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        sock.sendall(frame(1, b'{"op":"ping"}'))
        seen = b""
        try:
            while b'"pong"' not in seen:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("victim closed")
                seen += chunk
            rtts.append((time.perf_counter() - started) * 1000)
        except TimeoutError:
            lost += 1
        time.sleep(max(0.0, 1 / 15 - (time.perf_counter() - started)))
    sock.close()
    return rtts, lost


def summary(rtts: list[float]) -> dict[str, float]:
    if len(rtts) < 2:
        return {"n": len(rtts)}
    cuts = statistics.quantiles(rtts, n=10)
    return {"n": len(rtts), "p50": round(statistics.median(rtts), 2),
            "p90": round(cuts[8], 2), "max": round(max(rtts), 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["continuation", "ping", "spin"], default="continuation")
    parser.add_argument("--flooders", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ws, http = free_port(), free_port()
    config = (
        f"[websocket]\nport = {ws}\n[http]\nport = {http}\n[engine]\nsnapshot_enabled = false\n"
        f"[ingest]\nudp_port = {free_port(socket.SOCK_DGRAM)}\ntcp_port = {free_port()}\n"
        "[auth.hmac]\nsecret = 'frame-flood'\n"
    )
    with pushd_server(config, http) as server:
        before, _ = round_trips(ws, 2.0)
        rss_before = proc_rss_kib(server.pid)
        cpu_before = proc_cpu_seconds(server.pid)
        results: mp.Queue[dict[str, object]] = mp.Queue()
        flooders = [
            mp.Process(target=flood, args=(ws, args.mode, args.seconds, results))
            for _ in range(args.flooders)
        ]
        for p in flooders:
            p.start()
        time.sleep(0.5)  # the flood under way
        during, lost = round_trips(ws, args.seconds - 1.0)
        reports = [results.get(timeout=args.seconds + 30) for _ in flooders]
        for p in flooders:
            p.join()
        rss_after = proc_rss_kib(server.pid)
        cpu_s = proc_cpu_seconds(server.pid) - cpu_before
        time.sleep(3.0)  # the flood's closing connections are gone (close_timeout_s 2 s)
        rss_settled = proc_rss_kib(server.pid)
        alive = server.poll() is None
    codes: dict[str, int] = {}
    for report in reports:
        for code, n in report["close_codes"].items():  # type: ignore[attr-defined]
            codes[code] = codes.get(code, 0) + n
    print(json.dumps({
        "mode": args.mode, "flooders": args.flooders, "seconds": args.seconds,
        "victim_ms_alone": summary(before), "victim_ms_during": summary(during),
        "victim_pings_lost": lost,
        "frames_sent": sum(r["frames_sent"] for r in reports),  # type: ignore[misc]
        "flood_connections": sum(r["connections"] for r in reports),  # type: ignore[misc]
        "flood_close_codes": codes, "server_cpu_s": round(cpu_s, 2),
        "rss_kib_before": rss_before, "rss_kib_after": rss_after, "rss_kib_settled": rss_settled,
        "server_alive": alive,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
