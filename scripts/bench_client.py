"""The load generator of scripts/bench.py: processes holding many WebSocket subscribers.

Each process opens its connections from its own 127.0.0.x source address, subscribes (with the
target's subscribe frame, if it has one), and then counts frames by walking WebSocket frame
headers, decoding nothing but the publish timestamp of the last frame of every receive (the
latency sample), so that the client stays cheap. Frame counts per connection tell loss: every
subscriber must get every message published after it subscribed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import socket
import ssl
import time
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, Request, TextMessage

CLIENT_CPU = 1  # the load generator and publisher run on this core; the server on core 0
TLS_CA = "BENCH_TLS_CA"  # set (a CA file) by a wss:// target: every client process speaks TLS


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def open_ws(port: int, path: str, src: str, setup: list[bytes]) -> socket.socket:
    """A connected, upgraded WebSocket that sent ``setup`` (login, subscribe) and got each
    request's ``{"result":true...}``; blocking until then."""
    sock = socket.create_connection(("127.0.0.1", port), source_address=(src, 0), timeout=30)
    if ca_file := os.environ.get(TLS_CA):
        sock = ssl.create_default_context(cafile=ca_file).wrap_socket(
            sock, server_hostname="127.0.0.1"
        )
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target=path)))
    accepted = False
    while not accepted:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed during the handshake")
        ws.receive_data(data)
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    for frame in setup:
        sock.sendall(ws.send(TextMessage(data=frame.decode())))
        reply = b""
        while b"result" not in reply:  # {"result":true...}; nothing else can come before it
            reply += sock.recv(65536)
    sock.setblocking(False)
    return sock


def receive(sock: socket.socket) -> bytes | None:
    """What the socket has now (b"" at EOF, None if nothing); with TLS, every record that
    OpenSSL has buffered too (the selector does not see those)."""
    try:
        data = sock.recv(1 << 20)
        if isinstance(sock, ssl.SSLSocket):
            while sock.pending():
                data += sock.recv(1 << 20)
    except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
        return None
    except OSError:
        return b""
    return data


def walk(buf: bytes) -> tuple[int, int, int]:
    """(frames complete in buf, offset of the last one's payload or -1, bytes consumed)."""
    i, n, last, frames = 0, len(buf), -1, 0
    while i + 2 <= n:
        length = buf[i + 1] & 0x7F
        head = 2
        if length == 126:
            if i + 4 > n:
                break
            length = int.from_bytes(buf[i + 2 : i + 4], "big")
            head = 4
        elif length == 127:
            if i + 10 > n:
                break
            length = int.from_bytes(buf[i + 2 : i + 10], "big")
            head = 10
        if i + head + length > n:
            break
        last = i + head
        i += head + length
        frames += 1
    return frames, last, i


def subscriber_main(
    port: int,
    path: str,
    setups: list[list[bytes]],
    src: str,
    control: Any,
    out: mp.Queue,  # type: ignore[type-arg]
    stamp: bytes = b'"t":',
) -> None:
    """Hold one subscriber per ``setups`` entry until told to stop; report frames, latencies,
    CPU. ``stamp``: the key of the publish time (ns) in a frame.

    ``control`` is a shared array: [expected frames per connection (0 = not yet known),
    stop (1 = give up now)].
    """
    pin(CLIENT_CPU)
    socks = [open_ws(port, path, src, setup) for setup in setups]
    count = len(socks)
    sel = selectors.DefaultSelector()
    rest: dict[socket.socket, bytes] = {}
    got: dict[socket.socket, int] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        rest[s], got[s] = b"", 0
    out.put(("ready", count))
    latencies: list[int] = []
    cpu0 = time.process_time()
    idle_since = time.monotonic()
    while not control[1]:
        expected = control[0]
        events = sel.select(0.05)
        now = time.monotonic()
        if not events:
            if expected and now - idle_since > 2.0:
                break  # publishing is over and nothing came for 2 s: the rest is lost
            if expected and all(v >= expected for v in got.values()):
                break
            continue
        idle_since = now
        for key, _ in events:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = receive(sock)
            if data is None:
                continue
            if not data:
                sel.unregister(sock)
                continue
            buf = rest[sock] + data if rest[sock] else data
            frames, last, used = walk(buf)
            rest[sock] = buf[used:]
            got[sock] += frames
            if last >= 0:
                t_at = buf.find(stamp, last)
                if t_at >= 0:
                    latencies.append(time.time_ns() - int(buf[t_at + 4 : t_at + 23]))
        if expected and all(v >= expected for v in got.values()):
            break
    frames = sum(got.values())
    short = sum(max(0, control[0] - v) for v in got.values())
    out.put(("done", frames, short, latencies, time.process_time() - cpu0))
    for s in socks:
        s.close()


def idle_main(
    port: int, path: str, setup: list[bytes], count: int, src: str, control: Any, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Open ``count`` subscribed connections and hold them until told to stop."""
    pin(CLIENT_CPU)
    socks = [open_ws(port, path, src, setup) for _ in range(count)]
    out.put(("ready", count))
    while not control[1]:
        time.sleep(0.05)
    for s in socks:
        s.close()
    out.put(("done", count))


def storm_main(
    port: int, path: str, setup: list[bytes], seconds: float, src: str, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Connect, upgrade and subscribe as fast as one client can for ``seconds``; count them."""
    pin(CLIENT_CPU)
    socks: list[socket.socket] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(socks) < 4000:
        socks.append(open_ws(port, path, src, setup))
    out.put(("done", len(socks)))
    for s in socks:
        s.close()


def reader_main(
    port: int,
    path: str,
    setups: list[list[bytes]],
    src: str,
    control: Any,
    out: mp.Queue,  # type: ignore[type-arg]
    binance: bool = False,
) -> None:
    """Like ``subscriber_main`` but decoding every event: per-channel seq gaps and latency of
    every message (for the market mix, whose rates are lower and messages varied). ``binance``:
    Binance payloads (``binance_event``)."""
    import msgspec

    pin(CLIENT_CPU)
    socks = [open_ws(port, path, src, setup) for setup in setups]
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, tuple[Connection, dict[str, int]]] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        state[s] = (Connection(ConnectionType.CLIENT), {})  # already upgraded: frames only
    out.put(("ready", len(socks)))
    decode = msgspec.json.Decoder().decode
    latencies: list[int] = []
    gaps = frames = resyncs = closed = 0
    cpu0 = time.process_time()
    while not control[1]:
        for key, _ in sel.select(0.05):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:  # the server closed it (a slow reader): counted, not just dropped
                sel.unregister(sock)
                closed += 1
                continue
            ws, seqs = state[sock]
            ws.receive_data(data)
            now = time.time_ns()
            for event in ws.events():
                if not isinstance(event, TextMessage):
                    continue
                message = decode(event.data)
                if binance:
                    frames += 1
                    gaps += binance_event(message, seqs, now, latencies)
                    continue
                name = message.get("event")
                if message.get("resync"):
                    resyncs += 1
                    seqs.pop(name, None)
                    continue
                frames += 1
                seq, prev = message["seq"], seqs.get(name)
                if prev is not None and seq != prev + 1:
                    gaps += 1
                seqs[name] = seq
                latencies.append(now - message["data"]["t"])
    out.put(("done", frames, gaps, resyncs, latencies, time.process_time() - cpu0, closed))
    for s in socks:
        s.close()


# a Binance payload's chain: (its first id, its last id) by event type
_CHAINS = {"depthUpdate": ("U", "u"), "trade": ("t", "t")}


def binance_event(message: Any, chains: dict[str, int], now: int, latencies: list[int]) -> int:
    """One Binance payload of the market mix: its latency (``E``: the publish time in ns) and
    whether it broke its chain (1: a depth ``U`` that is not the last ``u`` + 1, a trade id
    that is not the last + 1; tickers have none)."""
    latencies.append(now - message["E"])
    chain = _CHAINS.get(message["e"])
    if chain is None:
        return 0
    key = message["e"] + message["s"]
    prev = chains.get(key)
    chains[key] = message[chain[1]]
    return int(prev is not None and message[chain[0]] != prev + 1)


def staller_main(
    port: int, path: str, setups: list[list[bytes]], src: str, control: Any, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Subscribers that never read again after subscribing (tiny receive buffers)."""
    pin(CLIENT_CPU)
    socks = []
    for setup in setups:
        sock = open_ws(port, path, src, setup)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        socks.append(sock)
    out.put(("ready", len(socks)))
    while not control[1]:
        time.sleep(0.05)
    out.put(("done", len(socks)))
    for s in socks:
        s.close()


def probe_main(
    port: int, path: str, setup: list[bytes], control: Any, out: mp.Queue,  # type: ignore[type-arg]
    stamp: bytes = b'"t":',
) -> None:  # fmt: skip
    """One subscriber at real-time priority (SCHED_FIFO, root only) that timestamps every
    frame it gets: publish->receive latency as the server delivers it, not as a busy load
    generator gets round to reading it."""
    pin(CLIENT_CPU)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        realtime = True
    except (AttributeError, PermissionError, OSError):
        realtime = False
    sock = open_ws(port, path, "127.0.0.1", setup)
    sock.settimeout(0.1)
    latencies: list[int] = []
    rest = b""
    out.put(("ready", realtime))
    while not control[1]:
        data = receive(sock)
        if data is None:
            continue
        now = time.time_ns()
        if not data:
            break
        buf = rest + data
        i = 0
        while True:
            frames, _last, used = walk(buf[i:])
            if not frames:
                break
            start = i
            i += used
            at = start
            while (at := buf.find(stamp, at, i)) >= 0:
                latencies.append(now - int(buf[at + 4 : at + 23]))
                at += 4
        rest = buf[i:]
    sock.close()
    out.put(("done", latencies))
