"""The page's client module (pushd/static/pushd-client.js) under ``node --test``, against a
daemon on a simulated market: its book equals the REST snapshot at the same update id, it logs
in and gets its own orders, a refused token after a reconnect leaves it live and logged
out, after a dropped connection it recovers the trades it missed (each once: a subscribe's reply
read in one go with the events after it is taken before them), and a replay larger than its
buffer (while events pour in) converges with one reconnect."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import trio
from conftest import PUBLISH_TOKEN, feed, start_simulated

from ingest.sim import Market

ROOT = Path(__file__).parent.parent
NODE = shutil.which("node") or "/usr/bin/node"


async def test_client_module_under_node(nursery: trio.Nursery) -> None:
    market = Market(seed=9, rate=4.0)
    running = await start_simulated(nursery, market)
    nursery.start_soon(feed(running, market))
    env = {
        **os.environ,
        "PUSHD_WS": running.ws_url,
        "PUSHD_HTTP": running.http_url,
        "PUSHD_TOKEN": running.token("1001"),
        "PUSHD_PUBLISH_TOKEN": PUBLISH_TOKEN,
    }
    command = [NODE, "--experimental-websocket", "--test", "--test-reporter=tap", "tests/js/"]
    with tempfile.TemporaryFile() as output:
        with trio.move_on_after(60) as timer:  # a test that hangs still shows its report
            done = await trio.run_process(
                command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, check=False
            )
        output.seek(0)
        report = output.read().decode()
    assert not timer.cancelled_caught, "node --test ran over 60 s:\n" + report[-4000:]
    assert done.returncode == 0, report[-4000:]
    assert "# fail 0" in report and "# skipped 0" in report, report[-2000:]
    assert "# pass 13" in report, report[-2000:]  # every test ran, the daemon ones too
