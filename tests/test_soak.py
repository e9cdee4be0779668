"""Issue 18's soak, short: legitimate traffic and every outside attack at once, on ``pushd run
--workers 2`` with the Redis bus, must leave every process running, RSS flat after warm-up, and
the legitimate clients whole (scripts/soak.py judges; this runs it for 70 s)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
ATTACKS = ("continuation", "ping", "oversize", "bad-tokens", "storm", "since", "token-expiry",
           "uids", "publish-utf8", "ingest-forge", "ingest-idle", "sighup")  # fmt: skip


def test_soak_with_every_attack_at_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "70", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    report = result.stdout + result.stderr[-4000:]
    # an attack's own line starts at the margin ("ping   sent: pings 19,000, ..."); the lines
    # under it are indented (and may say "sent:" too: "16 x header ..., 8 KiB sent: close")
    attacked = {found[1] for line in result.stdout.splitlines()
                if (found := re.match(r"(\S+)\s+sent: \S", line))}  # fmt: skip
    assert result.returncode == 0, report
    assert result.stdout.rstrip().endswith("PASS"), report
    assert attacked == set(ATTACKS), f"attacks that sent nothing: {set(ATTACKS) - attacked}"
