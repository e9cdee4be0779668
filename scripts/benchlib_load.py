"""The benchmark's load: messages, the subscriber and probe processes (``bench_client``, on
the client core), and the paced publisher loop."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from bench_client import probe_main, subscriber_main
from benchlib_targets import Target


def message(n: int, size: int) -> bytes:
    body = b'{"t":%d,"n":%d,"pad":"' % (time.time_ns(), n)
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def spawn(main: Callable[..., None], arguments: list[tuple[Any, ...]]) -> list[mp.Process]:
    """Start one load-generator process per entry of ``arguments``."""
    procs = [mp.Process(target=main, args=args) for args in arguments]
    for p in procs:
        p.start()
    return procs


class Probe:
    """The real-time-priority latency probe: one more subscriber, every frame timestamped."""

    def __init__(self, target: Target, setup: list[bytes]) -> None:
        self.control = mp.Array("q", [0, 0], lock=False)
        self.out: mp.Queue[Any] = mp.Queue()
        self.proc = mp.Process(
            target=probe_main,
            args=(target.port, target.path, setup, self.control, self.out, target.stamp),
        )
        self.proc.start()
        self.realtime = self.out.get(timeout=60)[1]

    def collect(self) -> list[int]:
        self.control[1] = 1
        latencies: list[int] = self.out.get(timeout=60)[1]
        self.proc.join()
        return sorted(latencies)


class Subscribers:
    """Client processes holding subscribers; ``collect`` returns what they saw."""

    def __init__(self, target: Target, processes: int, setups: list[list[bytes]]) -> None:
        """One subscriber per ``setups`` entry (its login and subscribe frames)."""
        self.control = mp.Array("q", [0, 0], lock=False)
        self.out: mp.Queue[Any] = mp.Queue()
        self.procs = spawn(
            subscriber_main,
            [
                (
                    target.port,
                    target.path,
                    setups[i::processes],
                    f"127.0.0.{10 + i}",
                    self.control,
                    self.out,
                    target.stamp,
                )
                for i in range(processes)
            ],
        )
        for _ in self.procs:
            assert self.out.get(timeout=120)[0] == "ready"

    def collect(self, expected_each: int) -> dict[str, Any]:
        self.control[0] = expected_each
        frames, short, lat, cpu = 0, 0, [], 0.0
        for _ in self.procs:
            _, f, s, latencies, c = self.out.get(timeout=120)
            frames, short, cpu = frames + f, short + s, cpu + c
            lat += latencies
        for p in self.procs:
            p.join()
        lat.sort()
        return {"frames": frames, "lost": short, "latencies": lat, "client_cpu": cpu}


def publish_for(
    publish: Callable[[list[bytes]], None],
    rate: float,
    seconds: float,
    batch: int,
    size: int,
    make: Callable[[int, int], bytes] = message,
) -> int:
    """Publish at ``rate`` messages/s for ``seconds`` in batches; returns how many."""
    sent, interval = 0, batch / rate
    start = next_at = time.perf_counter()
    while time.perf_counter() - start < seconds:
        publish([make(sent + i, size) for i in range(batch)])
        sent += batch
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return sent


def pct(lat: list[int], q: float) -> float:
    return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else float("nan")


def pattern(batch: int) -> str:
    """How the publisher calls: one message per call, or bursts (one HTTP batch for pushd;
    that many WebSocket publish frames in one write for the peers, each its own publish)."""
    return "1/call" if batch == 1 else f"burst {batch}"


def client_limit(busy: float) -> str:
    """ "yes" when the client core was past ~80 %: the load generator, not the server, may
    have been the limit (the subscriber processes share one core)."""
    return "yes" if busy > 0.8 else "no"
