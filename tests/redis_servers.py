"""Real Redis servers for the tests: private ``redis-server`` processes on free ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from conftest import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One ``redis-server`` that keeps nothing on disk; ``restart`` loses every key, as a
    crashed Redis without persistence does."""

    def __init__(self, *, cluster: bool = False, port: int | None = None) -> None:
        self.port = port or free_port()
        self.cluster = cluster
        self._dir = Path(tempfile.mkdtemp(prefix="pushd-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self._dir), "--protected-mode", "no",
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self._process.stdout is not None
        for line in self._process.stdout:  # the server says when it listens
            if b"Ready to accept connections" in line:
                # read the rest of its log so that a full pipe never blocks it
                threading.Thread(target=self._process.stdout.read, daemon=True).start()
                return
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        self.kill()
        if self.cluster:
            (self._dir / "nodes.conf").unlink(missing_ok=True)
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
