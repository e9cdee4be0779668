"""The long fuzz run: every surface of tests/test_fuzz.py with many cases, then one table.

    .venv/bin/python scripts/fuzz.py --cases 100000

Runs the same tests as CI against one real ``pushd run`` process, with ``--cases`` examples per
surface (the HTTP API gets a tenth of them per operation: schemathesis runs each operation), and
prints cases, RSS before and after, and the wall time of each surface (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=100_000, help="cases per surface")
    parser.add_argument("-k", default="", help="pytest -k expression: some surfaces only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.jsonl"
        env = {**os.environ, "PUSHD_FUZZ_EXAMPLES": str(args.cases),
               "PUSHD_FUZZ_REPORT": str(report)}  # fmt: skip
        started = time.monotonic()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "test_fuzz.py"),
                   str(ROOT / "tests" / "test_ingest_auth_fuzz.py")]  # fmt: skip
        command += ["-k", args.k] if args.k else []
        code = subprocess.call(command, cwd=ROOT, env=env)
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    print(f"\n{'surface':<12} {'cases':>9} {'RSS before':>12} {'RSS after':>11}")
    for row in rows:
        print(f"{row['surface']:<12} {row['cases']:>9} {row['rss_before_kib']:>9} KiB"
              f" {row['rss_after_kib']:>8} KiB")  # fmt: skip
    print(f"total {time.monotonic() - started:.0f} s, pytest exit code {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
