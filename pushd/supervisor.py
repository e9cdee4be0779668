"""``pushd run --workers N``: N gateway processes sharing the WebSocket port, plus one compute
process, each a plain ``pushd run`` child supervised here.

::

    supervisor (this process: no sockets of its own but the port reservation)
    ├── pushd run --role compute           ingest, poller, market streams, the HTTP API
    ├── pushd run --role gateway --reuse-port --websocket-port P --http-port 0
    └── ... N gateways; the kernel spreads new connections over them (SO_REUSEPORT)

A child that exits is started again after a backoff (reset once it has run for a while).
SIGTERM or SIGINT is passed to every child, which drains its clients (close 1001) and exits;
the supervisor returns when all have. The nodes share state only through Redis, which is why
``--workers`` needs ``bus.kind = "redis"``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path

import structlog
import trio

from pushd.config import Config
from pushd.notify import Notifier

log = structlog.get_logger("pushd.supervisor")

RESTART_BACKOFF_S = (0.5, 10.0)  # first, most
PR_SET_PDEATHSIG = 1  # prctl(2)
# what systemd gives the service's main process; children get a relay socket instead
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
    config_path: Path, workers: int, ws_port: int, http_port: int
) -> list[tuple[str, list[str]]]:
    """The compute process keeps ``http.port``; gateway i serves its API (``/metrics``) on
    ``http.port + i``, a fixed port a Prometheus job can name (ephemeral if ``http.port`` is 0)."""
    run = [sys.executable, "-m", "pushd", "run", "--config", str(config_path)]
    gateway = ["--role", "gateway", "--reuse-port", "--websocket-port", str(ws_port)]
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
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker outlives it (Linux ``PR_SET_PDEATHSIG``); and SIGHUP ignored until the daemon
    installs its reload handler (a reload passed on while the child still imports would
    otherwise kill it: the default action; exec keeps an ignored signal ignored)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Supervisor:
    def __init__(self, config: Config, config_path: Path, workers: int) -> None:
        self._config = config
        self._config_path = config_path
        self._workers = workers
        self._stopping = False
        self._processes: dict[str, trio.Process] = {}
        self.restarts = 0
        self._notifier = Notifier()
        self._child_env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}

    async def run(self) -> None:
        ws = self._config.websocket
        with reserve_port(ws.host, ws.port) as reservation, tempfile.TemporaryDirectory() as tmp:
            port = reservation.getsockname()[1]
            log.info("supervising", workers=self._workers, websocket_port=port)
            children = child_commands(
                self._config_path, self._workers, port, self._config.http.port
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal)
                if self._notifier.enabled:  # systemd hears READY once every child is ready
                    relay = str(Path(tmp) / "notify.sock")
                    await nursery.start(self._relay_ready, relay, len(children))
                    self._child_env["NOTIFY_SOCKET"] = relay
                async with trio.open_nursery() as running:
                    for name, command in children:
                        running.start_soon(self._keep_running, name, command)
                nursery.cancel_scope.cancel()  # every child has stopped: the relay too
        self._notifier.close()
        log.info("stopped")

    async def _relay_ready(
        self, path: str, children: int, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Children notify this socket; the first time all have said READY, tell systemd, then
        ping systemd's watchdog from this loop. A READY counts for the child that sent it (the
        kernel names the sender's pid), so one that says it twice (a reload, a restart) before
        the others are ready is not counted twice. The children's own loops are not watched
        here: one that exits is restarted, one that hangs is not detected (yet)."""
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            await listener.bind(path)
            task_status.started()
            ready: set[str] = set()
            while len(ready) < children:
                data, ancillary, _, _ = await listener.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
                name = self._child_named(_sender_pid(ancillary))
                if name is not None and b"READY=1" in data.split(b"\n"):
                    ready.add(name)
            status = f"{children - 1} gateway workers and a compute process ready"
            self._notifier.send(READY=1, STATUS=status)
            log.info("all children ready")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._notifier.watchdog, lambda: status)
                while True:  # later READYs (a restarted child) need no answer
                    await listener.recv(4096)

    def _child_named(self, pid: int | None) -> str | None:
        return next((name for name, p in self._processes.items() if p.pid == pid), None)

    async def _keep_running(self, name: str, command: list[str]) -> None:
        backoff = RESTART_BACKOFF_S[0]
        while not self._stopping:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:  # cancelled: SIGTERM, SIGKILL after 5 s
                run = functools.partial(
                    trio.run_process, command, check=False, preexec_fn=_prepare_child,
                    env=self._child_env,
                )  # fmt: skip
                process: trio.Process = await nursery.start(run)
                self._processes[name] = process
                log.info("child started", child=name, pid=process.pid)
            self._processes.pop(name, None)
            code = process.returncode
            if self._stopping:
                log.info("child stopped", child=name, pid=process.pid, code=code)
                return
            self.restarts += 1
            if trio.current_time() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_S[0]
            log.warning("child exited: restarting", child=name, pid=process.pid, code=code,
                        after_s=backoff)  # fmt: skip
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])

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
