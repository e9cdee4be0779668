"""``pushd run --workers N``: N gateway processes sharing the WebSocket port, plus one compute
process, each a plain ``pushd run`` child supervised here.

::

    supervisor (this process: no sockets of its own but the port reservation)
    ├── pushd run --role compute           ingest, poller, market streams, the HTTP API
    ├── pushd run --role gateway --reuse-port --websocket-port P --http-port 0
    │             [--binance-spot-port S --binance-futures-port F]   (those enabled)
    └── ... N gateways; the kernel spreads new connections over them (SO_REUSEPORT)

A child that exits is started again after a backoff (reset once it has run for a while). A
child whose event loop stops beating (``WATCHDOG=1`` over the relay socket, every half
``workers.watchdog_s``) is killed and started again the same way. Every child holds the read
end of a pipe whose write end only the supervisor holds (the *lifeline*): when the supervisor
is gone, even by SIGKILL, the pipe reads end-of-file and the child drains and exits.
SIGTERM or SIGINT is passed to every child, which drains its clients (close 1001) and exits;
the supervisor returns when all have. The nodes share state only through Redis, which is why
``--workers`` needs ``bus.kind = "redis"``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
import structlog
import trio

from pushd.backoff import Backoff
from pushd.config import BinanceSurfaceConfig, Config
from pushd.liveness import LIFELINE_VARIABLE, REASONS, REPORT_VARIABLE, Beats, Report
from pushd.notify import Notifier

log = structlog.get_logger("pushd.supervisor")

RESTART_BACKOFF_S = (0.5, 10.0)  # first, most
# what systemd gives the service's main process; children get the supervisor's relay instead
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STABLE_AFTER_S = 30.0  # a child that ran this long restarts with the first backoff again


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket holding the WebSocket port for the workers
    (port 0: a free one). It takes no connections: only listening sockets do."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def child_commands(
    config_path: Path, workers: int, ws_port: int, http_port: int,
    binance_ports: Mapping[str, int] | None = None,
) -> list[tuple[str, list[str]]]:  # fmt: skip
    """The compute process keeps ``http.port``; gateway i serves its API (``/metrics``) on
    ``http.port + i``, a fixed port a Prometheus job can name (ephemeral if ``http.port`` is 0).
    ``binance_ports``: the port each enabled Binance surface shares, by market."""
    run = [sys.executable, "-m", "pushd", "run", "--config", str(config_path)]
    gateway = ["--role", "gateway", "--reuse-port", "--websocket-port", str(ws_port)]
    for market, port in (binance_ports or {}).items():
        gateway += [f"--binance-{market}-port", str(port)]
    children = [("compute", [*run, "--role", "compute"])]
    children += [
        (f"gateway-{i}", [*run, *gateway, "--http-port", str(http_port + i if http_port else 0)])
        for i in range(1, workers + 1)
    ]
    return children


UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid (SCM_CREDENTIALS)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return int(UCRED.unpack(data[: UCRED.size])[0])
    return None


def _prepare_child() -> None:
    """In the child, before exec: SIGHUP ignored until the daemon installs its reload handler
    (a reload passed on while the child still imports would otherwise kill it: the default
    action; exec keeps an ignored signal ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def watch_lifeline(
    supervisor_gone: Callable[[], None], environ: Mapping[str, str] = os.environ
) -> None:
    """In a child of the supervisor: call ``supervisor_gone`` once the lifeline reads
    end-of-file, i.e. no process holds its write end any more: the supervisor has exited,
    however it ended (SIGKILL too). Returns at once in a process that is no such child."""
    fd = environ.get(LIFELINE_VARIABLE, "")
    if not fd.isdigit():
        return
    lifeline = int(fd)
    try:
        os.fstat(lifeline)
    except OSError:
        log.warning("no lifeline: the supervisor's pipe is not open here", fd=lifeline)
        return
    while True:  # nobody writes to it: readable means end-of-file
        await trio.lowlevel.wait_readable(lifeline)
        if not os.read(lifeline, 4096):
            break
    log.warning("supervisor gone: stopping")
    supervisor_gone()


class Supervisor:
    def __init__(self, config: Config, config_path: Path, workers: int) -> None:
        self._config = config
        self._config_path = config_path
        self._workers = workers
        self._stopping = False
        self._processes: dict[str, trio.Process] = {}
        self._notifier = Notifier()
        self._child_env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        self._beats = Beats(config.workers.watchdog_s)
        self._hung: set[int] = set()  # pids killed for their silence
        self._replaced: dict[str, dict[str, int]] = {}
        self._report = Path()
        self._lifeline = -1  # the read end, passed to every child

    async def run(self) -> None:
        ws = self._config.websocket
        # the write end stays in this process only (os.pipe makes both ends close on exec,
        # and a child inherits only the read end, by pass_fds)
        self._lifeline, lifeline_held = os.pipe()
        try:
            with reserve_port(ws.host, ws.port) as reservation, \
                    contextlib.ExitStack() as reservations, \
                    tempfile.TemporaryDirectory() as tmp:  # fmt: skip
                port = reservation.getsockname()[1]
                binance_ports = {  # the Binance listeners are shared the same way
                    market: reservations.enter_context(
                        reserve_port(own.host, own.port)).getsockname()[1]
                    for market, own in self._binance_surfaces().items()
                }  # fmt: skip
                log.info("supervising", workers=self._workers, websocket_port=port,
                         binance_ports=binance_ports, watchdog_s=self._beats.timeout_s)  # fmt: skip
                children = child_commands(
                    self._config_path, self._workers, port, self._config.http.port,
                    binance_ports,
                )  # fmt: skip
                self._replaced = {name: dict.fromkeys(REASONS, 0) for name, _ in children}
                self._report = Path(tmp) / "report.json"
                self._write_report()
                relay = str(Path(tmp) / "notify.sock")
                self._child_env.update(
                    NOTIFY_SOCKET=relay,  # READY and the beats (WATCHDOG=1) come here
                    WATCHDOG_USEC=str(int(self._beats.timeout_s * 1e6)),
                    **{LIFELINE_VARIABLE: str(self._lifeline)},
                )
                await self._supervise(children, relay)
        finally:
            os.close(lifeline_held)
            os.close(self._lifeline)
        self._notifier.close()
        log.info("stopped")

    def _binance_surfaces(self) -> dict[str, BinanceSurfaceConfig]:
        binance = self._config.binance
        surfaces = {"spot": binance.spot, "futures": binance.futures}
        return {market: own for market, own in surfaces.items() if own.enabled}

    async def _supervise(self, children: list[tuple[str, list[str]]], relay: str) -> None:
        all_ready = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_signal)
            await nursery.start(self._listen, relay, len(children), all_ready)
            nursery.start_soon(self._kill_the_silent)
            if self._notifier.enabled:
                nursery.start_soon(self._tell_systemd, len(children), all_ready)
            async with trio.open_nursery() as running:
                for name, command in children:
                    env = self._child_env
                    if name == "compute":  # it exports the supervisor's counts
                        env = {**env, REPORT_VARIABLE: str(self._report)}
                    running.start_soon(self._keep_running, name, command, env)
            nursery.cancel_scope.cancel()  # every child has stopped: the relay too

    async def _listen(
        self, path: str, children: int, all_ready: trio.Event,
        *, task_status: trio.TaskStatus[None],
    ) -> None:  # fmt: skip
        """Children notify this socket. Every READY=1 or WATCHDOG=1 is a beat of the child
        that sent it (the kernel names the sender's pid: a child cannot beat for another,
        and a replaced child's late datagrams count for nobody); after STOPPING=1 its
        silence is allowed for a while (it drains and exits). ``all_ready`` is set the
        first time every child has said READY; a child that says it twice (a reload, a
        restart) before the others are ready is not counted twice."""
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            await listener.bind(path)
            task_status.started()
            ready: set[str] = set()
            while True:
                data, ancillary, _, _ = await listener.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
                name = self._child_named(_sender_pid(ancillary))
                if name is None:
                    continue
                said = data.split(b"\n")
                if b"WATCHDOG=1" in said or b"READY=1" in said:
                    self._beats.beat(name, trio.current_time())
                if b"STOPPING=1" in said:
                    log.info("child stopping", child=name, pid=_sender_pid(ancillary))
                    self._beats.stopping(name, trio.current_time())
                if b"READY=1" in said and not all_ready.is_set():
                    ready.add(name)
                    if len(ready) == children:
                        log.info("all children ready")
                        all_ready.set()

    async def _tell_systemd(self, children: int, all_ready: trio.Event) -> None:
        """systemd hears READY once every child is ready, then the watchdog pings of this
        process's own loop (the children's beats stay here)."""
        await all_ready.wait()
        status = f"{children - 1} gateway workers and a compute process ready"
        self._notifier.send(READY=1, STATUS=status)
        await self._notifier.watchdog(lambda: status)

    async def _kill_the_silent(self) -> None:
        """SIGKILL a child silent for ``workers.watchdog_s``; ``_keep_running`` replaces it.
        SIGKILL because a hung loop would never act on SIGTERM, and its clients learn that
        their connection ended only once the kernel closes its sockets."""
        while True:
            now = trio.current_time()
            for name, silence in self._beats.overdue(now):
                process = self._processes.get(name)
                if process is None:
                    continue
                log.error("child hung: killing it", child=name, pid=process.pid,
                          silent_s=round(silence, 3))  # fmt: skip
                self._hung.add(process.pid)
                process.kill()
            await trio.sleep_until(self._beats.next_check(now))

    def _child_named(self, pid: int | None) -> str | None:
        return next((name for name, p in self._processes.items() if p.pid == pid), None)

    async def _keep_running(self, name: str, command: list[str], env: dict[str, str]) -> None:
        backoff = Backoff(*RESTART_BACKOFF_S)
        while not self._stopping:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:  # cancelled: SIGTERM, SIGKILL after 5 s
                run = functools.partial(
                    trio.run_process, command, check=False, preexec_fn=_prepare_child,
                    env=env, pass_fds=(self._lifeline,),
                )  # fmt: skip
                process: trio.Process = await nursery.start(run)
                self._processes[name] = process
                log.info("child started", child=name, pid=process.pid)
            self._processes.pop(name, None)
            self._beats.forget(name)
            code = process.returncode
            if self._stopping:
                log.info("child stopped", child=name, pid=process.pid, code=code)
                return
            reason = "hung" if process.pid in self._hung else "exited"
            self._hung.discard(process.pid)
            self._replaced[name][reason] += 1
            self._write_report()
            if trio.current_time() - started > STABLE_AFTER_S:
                backoff.reset()
            delay = backoff.next()
            log.warning("child exited: restarting", child=name, pid=process.pid, code=code,
                        reason=reason, after_s=delay)  # fmt: skip
            await trio.sleep(delay)

    def _write_report(self) -> None:
        """Replace the report file whole: a scrape never reads half of it. A write that fails
        (a full disk, the directory cleaned away) is logged: the report only feeds /metrics,
        and the supervisor ending would end every child."""
        part = self._report.with_suffix(".part")
        try:
            part.write_bytes(msgspec.json.encode(Report(self._replaced)))
            part.replace(self._report)
        except OSError as exc:
            log.error("supervisor report not written", path=str(part), error=str(exc))

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:  # each child re-reads the file itself
                    log.info("signal received: reloading children", signal="SIGHUP")
                    for process in self._processes.values():
                        process.send_signal(signal.SIGHUP)
                    continue
                log.info("signal received: stopping children", signal=signal.Signals(signum).name)
                self._notifier.send(STOPPING=1, STATUS="draining every child")
                self._stopping = True
                for process in self._processes.values():
                    process.send_signal(signal.SIGTERM)
                return
