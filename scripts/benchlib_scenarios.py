"""The benchmark's scenarios: one function per scenario (``SCENARIOS``), each returning its
rows (``benchlib_report.row``).

``scripts/bench.py`` runs them; its docstring describes each scenario; the load they share
(clients, probe, publisher loop) is ``benchlib_load``. A little over 400 lines: six scenarios
of 30-100 lines each, which read best side by side."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from bench_client import idle_main, storm_main
from benchlib_load import (
    Probe,
    Subscribers,
    client_limit,
    message,
    pattern,
    pct,
    publish_for,
    spawn,
    split,
)
from benchlib_report import print_row, row
from benchlib_targets import PUBLISH_TOKEN, SECRET, TARGETS, Pushd, Target, running


def fanout_run(
    target: Target,
    subscribers: int,
    rate: float,
    args: argparse.Namespace,
    burst: int,
) -> dict[str, Any]:
    """N subscribers on one channel; ``rate`` messages/s for ``args.duration`` seconds.

    Server CPU and delivery time run from the first publish until every client has its last
    frame (or gave up after 2 s of silence), so queues drained late are counted too.
    """
    batch = max(1, min(burst, int(rate // 50) or 1))
    with running(target, subscribers):
        subs = Subscribers(target, args.processes, [target.setup] * subscribers)
        probe = Probe(target, target.setup)
        publish = target.publisher()
        redis_cpu = getattr(target, "redis_cpu", lambda: 0.0)
        cpu0, redis0, t0 = target.cpu(), redis_cpu(), time.perf_counter()
        sent = publish_for(publish, rate, args.duration, batch, args.size, target.make or message)
        seen = subs.collect(expected_each=sent)
        elapsed = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
        redis = redis_cpu() - redis0
        rss = target.rss_kib()
        lat = probe.collect()
    load_lat = seen["latencies"]
    return row(
        "broadcast",
        target.name,
        f"N={subscribers} {pattern(batch)}{' waiting' if target.waiting else ''} "
        f"rate={rate:g}/s size={args.size}",
        offered=sent * subscribers / args.duration,
        delivered=seen["frames"] / elapsed,
        per_cpu_s=seen["frames"] / cpu if cpu else float("nan"),
        p50=pct(lat, 0.5),
        p99=pct(lat, 0.99),
        p999=pct(lat, 0.999),
        max=lat[-1] / 1e6 if lat else float("nan"),
        load_p99=pct(load_lat, 0.99),
        lost=seen["lost"],
        cpu_pct=100 * cpu / elapsed,
        rss_mib=rss / 1024,
        client_cpu_pct=100 * seen["client_cpu"] / elapsed,
        client_limit=client_limit(seen["client_cpu"] / elapsed),
        **({"redis_us_msg": 1e6 * redis / sent,
            "per_cpu_s_with_redis": seen["frames"] / (cpu + redis)} if redis else {}),
    )  # fmt: skip


def broadcast(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for burst in args.batches:
        for name in targets:
            for rate in args.rates:
                result = fanout_run(TARGETS[name](), args.subscribers, rate, args, burst)
                rows.append(result)
                print_row(result)
                if result["lost"] or result["p99"] > args.p99_limit_ms:
                    break  # this target broke at this rate
    return rows


nan = float("nan")


def idle(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    """Subscribed connections held idle: server memory per connection; for pushd also with a
    login first (an HMAC token with an ``exp``: its lifetime is watched per connection)."""
    runs: list[tuple[str, str, list[bytes] | None]] = [(name, "", None) for name in targets]
    if "pushd" in targets:
        login = b'{"op":"auth","token":"%s"}' % token("1001").encode()
        runs.append(("pushd", " + login", [login, *Pushd.setup]))
    rows = []
    for name, label, setup in runs:
        target = TARGETS[name]()
        with running(target, args.idle):
            time.sleep(0.5)  # let the server settle before the baseline
            rss0 = target.rss_kib()
            gc0 = target.gc_full() if isinstance(target, Pushd) else (nan, nan)
            control = mp.Array("q", [0, 0], lock=False)
            out: mp.Queue[Any] = mp.Queue()
            counts = split(args.idle, 4)
            t0 = time.perf_counter()
            procs = spawn(
                idle_main,
                [
                    (
                        target.port,
                        target.path,
                        setup if setup is not None else target.setup,
                        counts[i],
                        f"127.0.0.{20 + i}",
                        control,
                        out,
                    )
                    for i in range(4)
                ],
            )
            opened = sum(out.get(timeout=300)[1] for _ in procs)
            took = time.perf_counter() - t0
            rss1 = target.rss_kib()
            gc1 = target.gc_full() if isinstance(target, Pushd) else (nan, nan)
            flush = flush_rounds(target) if isinstance(target, Pushd) else {}
            control[1] = 1
            for _ in procs:
                out.get(timeout=60)
            for p in procs:
                p.join()
        result = row(
            "idle",
            name,
            f"N={opened} subscribed{label}",
            per_conn_kib=(rss1 - rss0) / opened,
            rss_mib=rss1 / 1024,
            open_s=took,
            gc_full=gc1[0] - gc0[0],  # full collections while they connected, and their pauses
            gc_full_ms=1000 * (gc1[1] - gc0[1]),
            **flush,
        )
        rows.append(result)
        print_row(result)
    return rows


def kernel_tcp_kib() -> int:
    """The kernel's TCP buffer memory, all sockets (``/proc/net/sockstat``, pages of 4 KiB)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4
    return 0


def stalled(args: argparse.Namespace, _targets: list[str]) -> list[dict[str, Any]]:
    """pushd only: ``--stallers`` clients subscribe and never read while 2 MB each are offered:
    what one non-reading client costs the server (RSS) and the kernel (TCP buffer memory, both
    ends), with the default 64 KiB send buffer and with the kernel's autotuning (0)."""
    from bench_client import staller_main

    rows = []
    for sndbuf in (65536, 0):
        target = Pushd()
        target.extra_limits = (  # keep them (the worst case) and choose the send buffer
            f"stall_timeout_s = 600.0\nsocket_send_buffer_bytes = {sndbuf}\n"
        )
        with running(target, args.stallers):
            time.sleep(0.5)
            rss0, tcp0 = target.rss_kib(), kernel_tcp_kib()
            control = mp.Array("q", [0, 0], lock=False)
            out: mp.Queue[Any] = mp.Queue()
            setups = [target.setup] * args.stallers
            procs = spawn(
                staller_main, [(target.port, target.path, setups, "127.0.0.46", control, out)]
            )
            for _ in procs:
                assert out.get(timeout=300)[0] == "ready"
            rss1, tcp1 = target.rss_kib(), kernel_tcp_kib()
            publish = target.publisher()
            for n in range(40):  # 40 x 50 x 1 kB = 2 MB offered to each client
                publish([message(n * 50 + i, 1000) for i in range(50)])
            time.sleep(1.0)
            rss2, tcp2 = target.rss_kib(), kernel_tcp_kib()
            control[1] = 1
            for _ in procs:
                out.get(timeout=60)
            for p in procs:
                p.join()
        n = args.stallers
        result = row(
            "stalled", "pushd", f"N={n} never read, 2 MB offered, SO_SNDBUF={sndbuf or 'auto'}",
            server_kib_per_conn=(rss2 - rss1) / n, kernel_kib_per_conn=(tcp2 - tcp1) / n,
            rss_mib=rss2 / 1024, idle_kib_per_conn=((rss1 - rss0) + (tcp1 - tcp0)) / n,
        )  # fmt: skip
        rows.append(result)
        print_row(result)
    return rows


def flush_rounds(target: Pushd, rounds: int = 20) -> dict[str, float]:
    """One message at a time to every idle subscriber: how long one flush round writes in
    all (what an unbroken round would block the loop for) and the longest the flusher ran
    without yielding (the loop stall the gateway actually causes)."""
    publish = target.publisher()
    for n in range(rounds):
        publish([message(n, 100)])
        time.sleep(0.2)  # let the round finish before the next one: rounds, not bursts
    stats = httpx.get(
        f"http://127.0.0.1:{target.http_port}/v1/stats",
        headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
    ).json()
    return {"flush_round_ms": stats["flush_round_max_ms"],
            "loop_stall_ms": stats["flush_stall_max_ms"]}  # fmt: skip


def storm(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    """Connect + upgrade + subscribe as fast as 4 clients can; for pushd also with a login
    (an HMAC ``auth`` before the subscribe), which the peers do not have."""
    runs: list[tuple[str, str, list[bytes] | None]] = [(name, "", None) for name in targets]
    if "pushd" in targets:
        login = b'{"op":"auth","token":"%s"}' % token("1001").encode()
        runs.append(("pushd", " + login", [login, *Pushd.setup]))
    rows = []
    for name, label, setup in runs:
        target = TARGETS[name]()
        with running(target, 4 * 4000):
            out: mp.Queue[Any] = mp.Queue()
            cpu0 = target.cpu()
            procs = spawn(
                storm_main,
                [
                    (
                        target.port,
                        target.path,
                        setup if setup is not None else target.setup,
                        args.storm_seconds,
                        f"127.0.0.{30 + i}",
                        out,
                    )
                    for i in range(4)
                ],
            )
            opened = sum(out.get(timeout=120)[1] for _ in procs)
            cpu = target.cpu() - cpu0
            for p in procs:
                p.join()
        result = row(
            "storm",
            name,
            f"4 clients x {args.storm_seconds:g} s{label}",
            conns_per_s=opened / args.storm_seconds,
            per_cpu_s=opened / cpu if cpu else 0.0,
        )
        rows.append(result)
        print_row(result)
    return rows


# -- pushd-only scenarios (the peers have no login and no per-user channels) -----------------


def token(uid: str) -> str:
    from pushd.auth import issue_hmac_token

    return issue_hmac_token(SECRET, uid, 3600)


def private(args: argparse.Namespace, _targets: list[str]) -> list[dict[str, Any]]:
    """Each connection logged in as its own user and subscribed to its own @order."""
    users = args.users
    target = Pushd()
    with running(target, users):
        setups = [
            [
                b'{"op":"auth","token":"%s"}' % token(str(1000 + i)).encode(),
                b'{"op":"subscribe","channel":"@order"}',
            ]
            for i in range(users)
        ]
        subs = Subscribers(target, args.processes, setups)
        channels = [f"user_{1000 + i}_order" for i in range(users)]
        publish = target.publisher(channels)
        rate = args.private_rate
        cpu0, t0 = target.cpu(), time.perf_counter()
        sent = publish_for(publish, rate, args.duration, args.batch, args.size)
        seen = subs.collect(expected_each=sent // users)
        elapsed = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
    lat = seen["latencies"]
    result = row(
        "private",
        "pushd",
        f"users={users} rate={rate:g}/s",
        delivered=seen["frames"] / elapsed,
        per_cpu_s=seen["frames"] / cpu if cpu else 0.0,
        p50=pct(lat, 0.5),
        p99=pct(lat, 0.99),
        p999=pct(lat, 0.999),
        max=lat[-1] / 1e6 if lat else float("nan"),
        lost=seen["lost"],
    )
    print_row(result)
    return [result]


def market_message(kind: str) -> Callable[[int, str], bytes]:
    """Realistic payloads, each a whole native event of its symbol (the Binance dialect reads
    them): a 20-level depth diff, a trade batch of 3 (ids 3n, 3n+1, 3n+2 at tick n: one
    chain per symbol), a ticker; stamped with the publish time in ns (``t`` for pushd's
    readers, the time fields that become Binance's ``E`` for the dialect's)."""
    levels = ",".join(f'["65{i:03d}.1","0.{i:03d}"]' for i in range(10))

    def body(n: int, now: int) -> str:
        if kind == "depth":
            return (f'"e":"depthUpdate","U":1,"u":2,"pu":0,"bids":[{levels}],"asks":[{levels}],'
                    f'"checksum":1,"T":{now}')  # fmt: skip
        if kind == "trades":
            trades = ",".join(f'{{"id":{3 * n + i},"price":"65001.5","qty":"0.012","side":"buy",'
                              f'"ts":{now}}}' for i in range(3))  # fmt: skip
            return f'"trades":[{trades}]'
        return ('"open":"64000.1","high":"66000","low":"63900.5","last":"65001.5",'
                '"volume":"12345.678","quoteVolume":"802341234.5","change":"1001.4",'
                '"changePercent":"1.565","count":123456,"firstId":1,"lastId":123456,'
                f'"openTime":1,"closeTime":{now}')  # fmt: skip

    def make(n: int, symbol: str) -> bytes:
        now = time.time_ns()
        return f'{{"t":{now},"n":{n},"s":"{symbol}",{body(n, now)}}}'.encode()

    return make


def market_setup(names: list[str], i: int, binance: bool, epoch: str) -> list[bytes]:
    """Reader ``i``: depth and trades of one symbol, the ticker of another (through the
    Binance dialect: ``@depth@100ms``, ``@trade``, ``@ticker``). pushd's depth is asked
    ``since`` seq 0 of the bus's ``epoch``: the mix publishes diffs by HTTP and no state
    (no engine book), and a plain depth subscribe waits for a state (state first)."""
    a, b = names[i % len(names)], names[(i + 7) % len(names)]
    if binance:
        a, b = a.lower(), b.lower()
        streams = f'["{a}@depth@100ms","{a}@trade","{b}@ticker"]'
        return [f'{{"method":"SUBSCRIBE","params":{streams},"id":1}}'.encode()]
    return [f'{{"op":"subscribe","channel":["{a}@trades","{b}@ticker"]}}'.encode(),
            depth_since(a, epoch)]  # fmt: skip


def depth_since(symbol: str, epoch: str) -> bytes:
    since = f'{{"seq":0,"epoch":"{epoch}"}}'
    return f'{{"op":"subscribe","channel":"{symbol}@depth","since":{since}}}'.encode()


def probe_setup(names: list[str], binance: bool, epoch: str) -> list[bytes]:
    """The probe: depth and trades of every symbol."""
    if binance:
        every = ",".join(f'"{n.lower()}@depth@100ms","{n.lower()}@trade"' for n in names)
        return [f'{{"method":"SUBSCRIBE","params":[{every}],"id":1}}'.encode()]
    trades = ",".join(f'"{n}@trades"' for n in names)
    return [f'{{"op":"subscribe","channel":[{trades}]}}'.encode(),
            *(depth_since(n, epoch) for n in names)]  # fmt: skip


def market(args: argparse.Namespace, targets: list[str]) -> list[dict[str, Any]]:
    """20 symbols; each reader on depth + trades of one symbol and the ticker of another; the
    same run again with ``--stallers`` clients that stop reading: the readers' p99 and gaps.
    Targets: ``pushd`` and ``pushd-binance`` (the same streams through the Binance dialect;
    a trade batch of 3 is 3 frames there, as on Binance), whichever are asked (pushd if none)."""
    rows = []
    for name in [t for t in targets if t in ("pushd", "pushd-binance")] or ["pushd"]:
        for stallers in (0, args.stallers):
            rows.append(market_run(args, name, stallers))
    return rows


def market_run(args: argparse.Namespace, name: str, stallers: int) -> dict[str, Any]:
    from bench_client import reader_main, staller_main

    symbols = 20
    binance = name == "pushd-binance"
    target: Pushd = TARGETS[name](symbols)  # type: ignore[call-arg, assignment]
    names = target.symbols

    with running(target, args.readers + stallers):
        epoch = httpx.get(f"http://127.0.0.1:{target.http_port}/v1/trades",
                          params={"symbol": names[0]}).json()["epoch"]  # fmt: skip
        control = mp.Array("q", [0, 0], lock=False)
        out: mp.Queue[Any] = mp.Queue()
        procs = spawn(
            reader_main,
            [
                (
                    target.port,
                    target.path,
                    [market_setup(names, i, binance, epoch) for i in range(p, args.readers, 2)],
                    f"127.0.0.{40 + p}",
                    control,
                    out,
                    binance,
                )
                for p in range(2)
            ],
        )
        if stallers:
            procs += spawn(
                staller_main,
                [
                    (
                        target.port,
                        target.path,
                        [market_setup(names, i, binance, epoch) for i in range(stallers)],
                        "127.0.0.45",
                        control,
                        out,
                    )
                ],
            )
        for _ in procs:
            assert out.get(timeout=120)[0] == "ready"
        probe = Probe(target, probe_setup(names, binance, epoch))
        kinds = [("depth", 10), ("trades", 10), ("ticker", 1)]  # per symbol per second
        publishers = {k: target.publisher([f"{k}_{s}" for s in names]) for k, _ in kinds}
        cpu0 = target.cpu()
        sent, tick, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < args.duration:
            tick += 1
            for kind, per_s in kinds:
                if tick % (10 // per_s) == 0:
                    make = market_message(kind)
                    publishers[kind]([make(tick, n) for n in names])
                    sent += len(names)
            time.sleep(max(0.0, start + tick / 10 - time.perf_counter()))
        window = time.perf_counter() - start  # rates are per second of publishing
        time.sleep(1.0)  # let the readers take the last messages
        control[1] = 1
        probe_lat = probe.collect()
        frames = gaps = resyncs = closed = 0
        client_cpu = 0.0
        lat: list[int] = []
        for _ in procs:
            msg = out.get(timeout=60)
            if len(msg) == 7:  # a reader's (a staller's says only "done")
                frames, gaps, resyncs = frames + msg[1], gaps + msg[2], resyncs + msg[3]
                lat += msg[4]
                client_cpu += msg[5]
                closed += msg[6]
        for p in procs:
            p.join()
        cpu = target.cpu() - cpu0  # the tail's sends too: they are this window's messages
    lat.sort()
    result = row(
        "market",
        name,
        f"readers={args.readers} stallers={stallers}",
        delivered=frames / window,
        per_cpu_s=frames / cpu if cpu else 0.0,
        p50=pct(probe_lat, 0.5),
        p99=pct(probe_lat, 0.99),
        p999=pct(probe_lat, 0.999),
        max=probe_lat[-1] / 1e6 if probe_lat else float("nan"),
        load_p99=pct(lat, 0.99),
        lost=gaps,
        resyncs=resyncs,
        closed=closed,  # readers the server closed (a slow reader through the dialect)
        cpu_pct=100 * cpu / window,
        client_cpu_pct=100 * client_cpu / window,
    )
    print_row(result)
    return result


SCENARIOS: dict[str, Callable[[argparse.Namespace, list[str]], list[dict[str, Any]]]] = {
    "broadcast": broadcast,
    "market": market,
    "private": private,
    "idle": idle,
    "storm": storm,
    "stalled": stalled,
}
