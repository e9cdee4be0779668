#!/usr/bin/env python3
"""Refresh the README's picture of the market page: docs/page.png.

Starts ``pushd demo`` on free loopback ports (a day of simulated history, seed 1), waits until
it is ready, lets headless Chromium load the page (logged in as the demo user) for a few
seconds, and writes the screenshot. Run from the repository after ``./scripts/setup``:

    .venv/bin/python scripts/screenshot.py [--out docs/page.png] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    parser.add_argument("--seconds", type=float, default=8.0, help="page time before the shot")
    parser.add_argument("--size", default="1440,720")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="pushd-shot-") as tmp:
        config = Path(tmp) / "demo.toml"
        config.write_text(
            # port 0 everywhere: the kernel picks, the "pushd ready" line names the HTTP port
            "[websocket]\nport = 0\n[http]\nport = 0\n[ingest]\ntcp_port = 0\nudp_port = 0\n"
            '[engine]\nsnapshot_port = 0\n[log]\nformat = "json"\n'
            "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"
        )
        demo = subprocess.Popen(
            [sys.executable, "-m", "pushd", "demo", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            assert demo.stderr is not None
            for raw in demo.stderr:  # JSON log lines: wait for "pushd ready"
                line = json.loads(raw) if raw.startswith(b"{") else {}
                if line.get("event") == "pushd ready":
                    break
            else:
                print("screenshot: pushd demo ended before it was ready", file=sys.stderr)
                return 1
            # keep reading its log: a full pipe would stop the demo mid-screenshot
            threading.Thread(target=demo.stderr.read, daemon=True).start()
            url = f"http://127.0.0.1:{line['http']}/#demo"  # logged in as the demo user
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={tmp}/chromium", f"--window-size={args.size}",
                 f"--virtual-time-budget={int(args.seconds * 1000)}",
                 f"--screenshot={args.out}", url],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
            )  # fmt: skip
        finally:
            demo.terminate()
            demo.wait(10)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
