"""Real Redis servers for the tests: private ``redis-server`` processes on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """One ``redis-server`` that keeps nothing on disk; ``restart`` loses every key, as a
    crashed Redis without persistence does."""

    def __init__(self, *, cluster: bool = False, port: int | None = None) -> None:
        self.port = port or (cluster_port() if cluster else free_port())
        self._may_move = port is None  # a port we picked: another may take it before we bind
        self.cluster = cluster
        self._dir = Path(tempfile.mkdtemp(prefix="pushd-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until it listens. A port picked free and taken by someone else
        before the first start (the check-then-bind race) is picked again; a restart keeps
        its port (a Cluster node's place)."""
        for _ in range(5):
            said = self._start()
            if not said:
                self._may_move = False
                return
            if not (self._may_move and b"Address already in use" in said):
                break
            self.port = cluster_port() if self.cluster else free_port()
        raise RuntimeError(f"redis-server on port {self.port} did not start: {said[-500:]!r}")

    def _start(self) -> bytes:
        """Empty once it listens, else what it said before it ended."""
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self._dir), "--protected-mode", "no",
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self._process.stdout is not None
        said = b""
        for line in self._process.stdout:  # the server says when it listens
            said += line
            if b"Ready to accept connections" in line:
                # read the rest of its log so that a full pipe never blocks it
                threading.Thread(target=self._process.stdout.read, daemon=True).start()
                return b""
        self.kill()
        return said or b"(nothing)"

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def restart(self) -> None:
        """Kill and start again: every key is lost; a Cluster node keeps its place (nodes.conf)."""
        self.kill()
        self.start()

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class RedisCluster:
    """Three master nodes (no replicas) made into a Redis Cluster by ``redis-cli --cluster
    create``; ``restart`` restarts one node, which loses the keys of its slots."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(size)]
        self.cluster = True

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def __enter__(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_ok(self) -> None:
        """Until every node says the cluster is up (gossip has no event to wait on)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [self._info(node) for node in self.nodes]
            if all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not come up: {states}")

    @staticmethod
    def _info(node: RedisServer) -> str:
        result = subprocess.run([REDIS_CLI, "-p", str(node.port), "cluster", "info"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        return result.stdout

    def restart(self, tag: str) -> None:
        """Restart the node that holds the slot of hash tag ``tag`` (a channel's keys)."""
        self.owner(tag).restart()
        self.wait_ok()

    def owner(self, tag: str) -> RedisServer:
        port = str(self.nodes[0].port)
        slot = int(subprocess.run([REDIS_CLI, "-p", port, "cluster", "keyslot", tag],
                                  capture_output=True, text=True, timeout=10).stdout)  # fmt: skip
        table = subprocess.run([REDIS_CLI, "-p", port, "cluster", "nodes"],
                               capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        for line in table.splitlines():
            fields = line.split()
            node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for ranges in fields[8:]:
                low, _, high = ranges.partition("-")
                if int(low) <= slot <= int(high or low):
                    return next(n for n in self.nodes if n.port == node_port)
        raise RuntimeError(f"no node serves slot {slot}")

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.__exit__()


Redis = RedisServer | RedisCluster  # either kind a test may run against
