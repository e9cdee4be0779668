"""The systemd unit an SRE installs: ``systemd-analyze verify`` finds nothing to say about it,
and it asks for what pushd does (Type=notify with a watchdog) and needs (file descriptors)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pushd.config import WebSocketConfig

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pushd.service"


def settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    pushd = shutil.which("pushd", path=str(Path(sys.executable).parent))
    assert pushd is not None, "pushd is not installed next to this Python"
    unit = tmp_path / "pushd.service"  # ExecStart must name an executable that exists here
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pushd", pushd))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result


def test_the_unit_asks_for_what_pushd_does() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert int(unit["WatchdogSec"]) > 0
    assert int(unit["LimitNOFILE"]) > WebSocketConfig().max_connections
    assert unit["ExecStart"].endswith("run --config /etc/pushd/pushd.toml")
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP: tests/test_reload.py
    assert unit["CapabilityBoundingSet"] == "" and unit["NoNewPrivileges"] == "yes"
