"""``pushd run --workers N``: real processes sharing the WebSocket port (SO_REUSEPORT), a
compute process, supervision (a killed worker comes back), and a drain on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
import yaml
from conftest import (
    PUBLISH_TOKEN,
    SECRET,
    Logs,
    free_port,
    free_port_block,
    open_client,
    pushd_process,
)  # fmt: skip
from redis_servers import RedisServer
from scrape import Scrape
from test_ops import OPS, check_expression

from pushd.auth import issue_hmac_token

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@asynccontextmanager
async def supervisor(
    tmp_path: Path, redis: RedisServer, workers: int, env: dict[str, str] | None = None,
    ready: int | None = None, extra: str = "",
) -> AsyncIterator[Any]:  # fmt: skip
    """``pushd run --workers``, once ``ready`` processes (default: every child) are ready."""
    # every gateway binds the one WebSocket port (SO_REUSEPORT) and gateway i http_port + i:
    # port 0 would give each its own, so these are chosen here (check, then bind)
    ws_port, http_port = free_port(), free_port_block(workers + 1)
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = {ws_port}\n[http]\nport = {http_port}\n"
        f"publish_token = '{PUBLISH_TOKEN}'\n[auth.hmac]\nsecret = '{SECRET}'\n"
        "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
        "udp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_enabled = false\n"
        f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = '{redis.url}'\n"
        "[log]\nformat = 'json'\n" + extra
    )
    command = [sys.executable, "-m", "pushd", "run", "--config", str(config),
               "--workers", str(workers)]  # fmt: skip
    async with pushd_process(command, workers + 1 if ready is None else ready, env) as (
        process, logs,
    ):  # fmt: skip
        yield process, logs, ws_port, http_port


async def test_workers_share_the_port_and_a_killed_one_comes_back(
    tmp_path: Path, redis: RedisServer
) -> None:
    async with supervisor(tmp_path, redis, workers=2) as (process, logs, ws_port, http_port):
        url = f"ws://127.0.0.1:{ws_port}/ws"
        gateways = {line["http"]: line for line in await logs.until("pushd ready", 3)
                    if line["websocket"]}  # fmt: skip
        assert len(gateways) == 2 and {g["websocket"] for g in gateways.values()} == {ws_port}
        assert set(gateways) == {http_port + 1, http_port + 2}  # fixed ports: scrape targets
        async with trio.open_nursery() as nursery:
            clients = []
            for _ in range(24):
                client = await nursery.start(hold_client, url)
                clients.append(client)
            async with httpx.AsyncClient() as http:
                stats = (await http.get(f"http://127.0.0.1:{http_port}/v1/stats", headers=AUTH)
                         ).json()  # fmt: skip
                counts = [n["connections"] for n in stats["nodes"] if n["role"] == "gateway"]
                assert len(counts) == 2 and sum(counts) == stats["connections"] == 24
                assert min(counts) > 0  # the kernel spread them over both workers
                r = await http.post(
                    f"http://127.0.0.1:{http_port}/v1/publish",
                    headers=AUTH,
                    json={"channel": "user_1001_order", "data": {"n": 1}},
                )
                assert r.status_code == 200, r.text
            for client in clients:
                assert (await client.recv())["data"] == {"n": 1}
            started = await logs.until("child started", 3)
            victim = next(line["pid"] for line in started if line["child"] == "gateway-1")
            os.kill(victim, signal.SIGKILL)
            await logs.until("child exited: restarting", child="gateway-1")
            await logs.until("pushd ready", 4)  # it is back
            nursery.cancel_scope.cancel()
        # the killed worker's clients reconnect (to whichever worker the kernel picks)
        async with open_client(url) as client:
            await client.call({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 60)})
            since = {"seq": 1, "epoch": r.json()["epoch"]}
            async with httpx.AsyncClient() as http:
                await http.post(
                    f"http://127.0.0.1:{http_port}/v1/publish",
                    headers=AUTH,
                    json={"channel": "user_1001_order", "data": {"n": 2}},
                )
            reply = await client.call({"op": "subscribe", "channel": "@order", "since": since})
            assert reply["recovered"] is True
            assert (await client.recv())["data"] == {"n": 2}
            process.send_signal(signal.SIGTERM)  # a drain: every client is told 1001
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await client.recv()
            assert closed.value.reason.code == 1001
        with trio.fail_after(20):
            assert await process.wait() == 0
        await logs.until("stopped")


async def hold_client(url: str, task_status: Any) -> None:
    async with open_client(url) as client:
        await client.call({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 60)})
        await client.call({"op": "subscribe", "channel": "@order"})
        task_status.started(client)
        await trio.sleep_forever()


def test_workers_need_the_redis_bus(tmp_path: Path) -> None:
    config = tmp_path / "pushd.toml"
    config.write_text("[auth.hmac]\nsecret = 's'\n")
    command = [sys.executable, "-m", "pushd", "run", "--config", str(config), "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "bus.kind = 'redis'" in result.stderr


async def test_no_worker_outlives_a_killed_supervisor(tmp_path: Path, redis: RedisServer) -> None:
    async with supervisor(tmp_path, redis, workers=1) as (process, logs, _, _):
        children = [line["pid"] for line in await logs.until("child started", 2)]
        pidfds = [os.pidfd_open(pid) for pid in children]
        process.kill()  # SIGKILL: the supervisor cannot pass anything on
        try:
            with trio.fail_after(20):
                for pidfd in pidfds:  # readable once that process has exited
                    await trio.lowlevel.wait_readable(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)


async def test_children_outlive_trios_idle_threads_and_not_their_supervisor(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Trio retires an idle worker thread after 10 s; a child must not be tied to the thread
    that forked it (Linux sends ``PR_SET_PDEATHSIG`` when that *thread* exits), only to its
    supervisor. A real wait: the idle timer of the supervisor's threads is the point."""
    async with supervisor(tmp_path, redis, workers=1) as (process, logs, ws_port, http_port):
        started = await logs.until("child started", 2)
        pidfds = [os.pidfd_open(line["pid"]) for line in started]
        # the threads' idle timer starts when they fork: watch until twice it after the forks
        forked = max(_log_time(line) for line in started)
        try:
            with trio.move_on_after(forked + 20 - time.time()):  # every child still the same
                async with trio.open_nursery() as nursery:
                    for pidfd in pidfds:  # readable once that process has exited
                        nursery.start_soon(_ends, nursery, trio.lowlevel.wait_readable, pidfd)
                    nursery.start_soon(_ends, nursery, logs.until, "child exited: restarting")
                raise AssertionError(f"a child ended within 20 s of its start: {logs.lines[-3:]}")
            process.kill()  # SIGKILL: the supervisor cannot pass anything on
            with trio.fail_after(20):
                for pidfd in pidfds:
                    await trio.lowlevel.wait_readable(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        for port in (ws_port, http_port):  # no orphan holds a port: a new supervisor can start
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))


async def _ends(nursery: trio.Nursery, wait: Any, *args: Any) -> None:
    await wait(*args)
    nursery.cancel_scope.cancel()


async def test_systemd_hears_ready_once_every_child_is(tmp_path: Path, redis: RedisServer) -> None:
    """Under ``Type=notify`` the supervisor is the main process: the children notify a relay
    socket of its own, and systemd gets one READY=1 when all of them are ready."""
    path = tmp_path / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        await systemd.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        async with supervisor(tmp_path, redis, workers=2, env=env) as (
            process, logs, ws_port, http_port,
        ):  # fmt: skip
            with trio.fail_after(30):
                got = (await systemd.recv(4096)).decode()
                assert got.startswith("READY=1\n"), got
                async with httpx.AsyncClient() as http:  # everything serves when READY comes
                    ready = await http.get(f"http://127.0.0.1:{http_port}/readyz")
                    assert ready.status_code == 200, ready.text
                with socket.create_connection(("127.0.0.1", ws_port)):
                    pass
                await logs.until("all children ready")
                assert len(await logs.until("pushd ready", 3)) == 3  # every child said it
                got = (await systemd.recv(4096)).decode()
                assert got.startswith("WATCHDOG=1"), got  # the supervisor's own loop pings
                process.send_signal(signal.SIGTERM)
                while not (got := (await systemd.recv(4096)).decode()).startswith("STOPPING=1"):
                    assert got.startswith("WATCHDOG=1"), got  # no child talks to systemd
                assert await process.wait() == 0


async def test_a_reload_while_children_start_costs_no_child(
    tmp_path: Path, redis: RedisServer
) -> None:
    """SIGHUP reaching a child before its handler is installed (it is still importing) must
    not kill it: the children start with SIGHUP ignored until they can reload."""
    ws_port, http_port = free_port(), free_port_block(2)  # shared by the workers: see above
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = {ws_port}\n[http]\nport = {http_port}\n[auth.hmac]\nsecret = 's'\n"
        "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
        "udp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_enabled = false\n"
        f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = '{redis.url}'\n[log]\nformat = 'json'\n"
    )
    command = [sys.executable, "-m", "pushd", "run", "--config", str(config), "--workers", "1"]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert process.stderr is not None
        logs = Logs(process.stderr)
        with trio.fail_after(30):
            await logs.until("child started", 2)  # both are importing pushd now
            process.send_signal(signal.SIGHUP)
            await logs.until("pushd ready", 2)
        assert not [line for line in logs.lines if line["event"] == "child exited: restarting"]
    finally:
        process.kill()
        await process.wait()


async def test_a_child_that_says_ready_twice_counts_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    """A child that reloads (RELOADING=1, READY=1) while its siblings still start says READY
    twice; systemd must still hear READY only once every child listens."""
    path = tmp_path / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        await systemd.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        async with supervisor(tmp_path, redis, workers=2, env=env, ready=1) as (
            _, logs, _, http_port,
        ):  # fmt: skip
            with trio.fail_after(30):
                first = (await logs.until("pushd ready"))[0]  # siblings' may share its read
                name = {http_port: "compute", http_port + 1: "gateway-1",
                        http_port + 2: "gateway-2"}[first["http"]]  # fmt: skip
                (started,) = await logs.until("child started", child=name)
                os.kill(started["pid"], signal.SIGHUP)  # it reloads and says READY again
                got = (await systemd.recv(4096)).decode()
                assert got.startswith("READY=1\n"), got
                async with httpx.AsyncClient() as http:  # every child listens by now
                    for port in (http_port, http_port + 1, http_port + 2):
                        assert (
                            await http.get(f"http://127.0.0.1:{port}/healthz")
                        ).status_code == 200


async def test_a_hung_gateway_is_killed_and_replaced(tmp_path: Path, redis: RedisServer) -> None:
    """SIGSTOP one gateway: its event loop stops beating, and once it has been silent for
    ``workers.watchdog_s`` the supervisor SIGKILLs it and starts another. Its clients see their
    connection end (so they reconnect), the other gateway's clients keep their events, new
    clients are served, the compute process's /metrics counts the replacement, and the
    supervisor's own systemd watchdog goes on throughout."""
    path = tmp_path / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        await systemd.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        async with (
            supervisor(tmp_path, redis, workers=2, env=env, extra="[workers]\nwatchdog_s = 2.0\n")
            as (_, logs, ws_port, http_port),
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            told: list[tuple[float, str]] = []
            nursery.start_soon(_listen, systemd, told)
            url = f"ws://127.0.0.1:{ws_port}/ws"
            started = {line["child"]: line["pid"] for line in await logs.until("child started", 3)}
            # the kernel spreads connections over both gateways: open them until both hold
            # some (12 land on one gateway about once in 2000 runs; 64, never)
            clients = [await nursery.start(hold_client, url) for _ in range(12)]
            on_victim = await _open_connections(http_port + 1)  # gateway-1's /metrics
            while not 0 < on_victim < len(clients) and len(clients) < 64:
                clients.append(await nursery.start(hold_client, url))
                on_victim = await _open_connections(http_port + 1)
            assert 0 < on_victim < len(clients)
            try:
                with trio.fail_after(20):
                    os.kill(started["gateway-1"], signal.SIGSTOP)
                    stopped_at, stopped_wall = trio.current_time(), time.time()
                    (hung,) = await logs.until("child hung: killing it")
                    assert (hung["child"], hung["pid"]) == ("gateway-1", started["gateway-1"])
                    # not before watchdog_s of silence; the bound after it is only generous
                    # (the real timer is the point: a loaded machine delays the check)
                    assert 2.0 <= hung["silent_s"] < 15.0
                    (exited,) = await logs.until("child exited: restarting")
                    assert (exited["reason"], exited["code"]) == ("hung", -signal.SIGKILL)
                    await logs.until("pushd ready", 4)  # the replacement serves
                    replaced_s = trio.current_time() - stopped_at
                    killed_s = _log_time(hung) - stopped_wall
                    ended, served = await _publish_and_read(http_port, clients, {"n": 1})
                    assert ended == on_victim and served == len(clients) - on_victim
                    fresh = [await nursery.start(hold_client, url) for _ in range(8)]
                    assert await _publish_and_read(http_port, fresh, {"n": 2}) == (0, 8)
            finally:  # a failed test leaves no frozen process (it could not read its lifeline)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started["gateway-1"], signal.SIGCONT)
            print(
                f"SIGSTOP to SIGKILL {killed_s:.2f} s, to the replacement ready {replaced_s:.2f} s"
            )
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"http://127.0.0.1:{http_port}/metrics")).text
            metrics = Scrape(text)
            for child in ("compute", "gateway-1", "gateway-2"):
                for reason in ("exited", "hung"):
                    want = int((child, reason) == ("gateway-1", "hung"))
                    got = metrics.value("pushd_children_replaced_total", child=child, reason=reason)
                    assert got == want, (child, reason, got)
            rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
            exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]
                     if "pushd_children_replaced" in r["expr"]]  # fmt: skip
            assert exprs
            for expr in exprs:  # against a process that exports the series with its labels
                check_expression(expr, metrics, expr)
            # systemd heard READY once, then the supervisor's pings, during the hang as well
            assert [text for _, text in told if not text.startswith("WATCHDOG=1\n")] == [
                "READY=1\nSTATUS=2 gateway workers and a compute process ready"
            ]
            assert any(stopped_at < at < stopped_at + replaced_s for at, _ in told)
            nursery.cancel_scope.cancel()


async def _listen(systemd: trio.socket.SocketType, told: list[tuple[float, str]]) -> None:
    while True:
        text = (await systemd.recv(4096)).decode()
        told.append((trio.current_time(), text))


async def _open_connections(port: int) -> int:
    async with httpx.AsyncClient() as http:
        return int(Scrape((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
                   .value("pushd_connections_open"))  # fmt: skip


async def _publish_and_read(http_port: int, clients: list[Any], data: Any) -> tuple[int, int]:
    """Publish to uid 1001's orders: how many clients found their connection ended, and how
    many got the event."""
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{http_port}/v1/publish", headers=AUTH,
                            json={"channel": "user_1001_order", "data": data})  # fmt: skip
        assert r.status_code == 200, r.text
    ended = served = 0
    for client in clients:
        try:
            assert (await client.recv())["data"] == data
            served += 1
        except trio_websocket.ConnectionClosed as closed:
            assert closed.reason.code == 1006  # the kernel closed it: no close frame
            ended += 1
    return ended, served


def _log_time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


async def test_a_child_that_stops_is_not_taken_for_hung(tmp_path: Path, redis: RedisServer) -> None:
    """A child that drains (SIGTERM, here to it alone) stops beating when its loop ends, while
    its interpreter exits: that silence is allowed (for 30 s, as systemd's TimeoutStopSec
    replaces the watchdog while a unit stops). Its stop is frozen right after it said
    STOPPING=1, for three times ``workers.watchdog_s``: not killed, and replaced as exited."""
    async with supervisor(tmp_path, redis, workers=1, extra="[workers]\nwatchdog_s = 1.0\n") as (
        _, logs, _, _,
    ):  # fmt: skip
        started = (await logs.until("child started", child="gateway-1"))[-1]  # the live one
        victim = started["pid"]
        os.kill(victim, signal.SIGTERM)
        with trio.fail_after(20):
            await logs.until("child stopping", child="gateway-1")
            os.kill(victim, signal.SIGSTOP)
            try:
                with trio.move_on_after(3.0):
                    await logs.until("child hung: killing it")
                    raise AssertionError("a stopping child was taken for a hung one")
                assert _state(victim) == "T"  # it was frozen in its stop, not already gone
            finally:
                os.kill(victim, signal.SIGCONT)
            (exited,) = await logs.until("child exited: restarting", child="gateway-1")
            assert (exited["reason"], exited["code"]) == ("exited", 0)


def _state(pid: int) -> str:
    """The process state letter of /proc/<pid>/stat (R running, T stopped, Z exited)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_a_report_that_cannot_be_written_ends_no_child(
    tmp_path: Path, redis: RedisServer
) -> None:
    """The supervisor's report of replaced children is a convenience for /metrics: when it
    cannot be written (a full disk, the temporary directory cleaned under a long-running
    supervisor) that is logged, and the supervisor and every child go on."""
    async with supervisor(tmp_path, redis, workers=1) as (process, logs, _, http_port):
        started = {line["child"]: line["pid"] for line in await logs.until("child started", 2)}
        _block_report(started["compute"])
        os.kill(started["gateway-1"], signal.SIGKILL)
        with trio.fail_after(20):
            (failed,) = await logs.until("supervisor report not written")
            assert "directory" in failed["error"].lower()
            await logs.until("child exited: restarting", child="gateway-1")
            await logs.until("pushd ready", 3)  # the replacement serves
        assert process.returncode is None
        assert _state(started["compute"]) in "RS"  # the compute child was never restarted
        assert len(await logs.until("child started", 3)) == 3
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{http_port}/healthz")).status_code == 200


def _block_report(compute: int) -> None:
    """Make the supervisor's next report write fail: a directory where it writes the file (the
    compute child is told the report's path in its environment)."""
    environ = Path(f"/proc/{compute}/environ").read_bytes().split(b"\0")
    (report,) = [v.split(b"=", 1)[1] for v in environ
                 if v.startswith(b"PUSHD_SUPERVISOR_REPORT=")]  # fmt: skip
    Path(report.decode()).with_suffix(".part").mkdir()
