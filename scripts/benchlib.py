"""What the benchmarks share: free ports, a ``pushd run`` server process, its CPU and RSS.

The benchmarks choose their servers' ports (``free_port``, the tests' ``ports`` module): a
``pushd run`` here logs at ``warning``, where its "pushd ready" line (which names the ports it
bound to port 0) is not written, so the servers' costs stay what earlier runs measured."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # ports
from ports import free_port as free_port


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_ready(http_port: int, timeout_s: float = 20.0) -> None:
    """Return once a pushd on ``http_port`` answers /readyz (it polls: another process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"pushd on HTTP port {http_port} did not become ready")
        time.sleep(0.05)


@contextmanager
def pushd_server(config_toml: str, http_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``pushd run`` with this config, as its own process, once it answers /readyz."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config_toml + "\n[log]\nlevel = 'warning'\nformat = 'json'\n")
        config_path = f.name
    server = subprocess.Popen(
        [sys.executable, "-m", "pushd", "run", "--config", config_path],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(http_port)
        yield server
    finally:
        server.terminate()
        server.wait(10)
        os.unlink(config_path)


def metrics(http_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's Prometheus samples: (name, sorted labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
