"""The demo market page in a real browser: headless Chromium, driven over the DevTools protocol.

The page loads from the daemon's HTTP port, connects to the WebSocket, and must show a live
order book, trades, ticker, mark price and candles from the simulated engine; after logging in
with a demo token it must show that user's private events. The test awaits promises inside the
page (no polling sleeps in the test).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
import trio_websocket
from conftest import feed, start_simulated

from ingest.sim import Market

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--remote-allow-origins=*",
]  # fmt: skip

# resolves once the page shows every stream (the test's only wait, bounded by fail_after)
LIVE = """new Promise((resolve) => {
  const ready = () => document.querySelectorAll('#bids tr').length >= 10
    && document.querySelectorAll('#asks tr').length >= 10
    && document.querySelectorAll('#trades tr').length > 0
    && document.getElementById('status').textContent === 'live'
    && document.getElementById('last').textContent !== '\\u2013'
    && document.getElementById('mark').textContent !== '\\u2013';
  const check = () => ready() ? resolve(true) : requestAnimationFrame(check);
  check();
})"""

PRIVATE = """new Promise((resolve) => {
  document.getElementById('token').value = %s;
  document.getElementById('login').click();
  const seen = () => [...document.querySelectorAll('#events div')].map(d => d.textContent);
  const check = () => {
    const lines = seen();
    lines.some(l => l.startsWith('@order')) ? resolve(lines) : requestAnimationFrame(check);
  };
  check();
})"""


class DevTools:
    """Just enough of the Chrome DevTools protocol: call a method, wait for an event."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._events: list[str] = []

    async def call(self, method: str, **params: Any) -> Any:
        call_id = next(self._ids)
        await self._ws.send_message(  # a text frame: DevTools closes on binary ones
            msgspec.json.encode({"id": call_id, "method": method, "params": params}).decode()
        )
        while True:
            reply = msgspec.json.decode(await self._ws.get_message())
            if reply.get("id") == call_id:
                assert "error" not in reply, reply
                return reply["result"]
            if "method" in reply:
                self._events.append(reply["method"])

    async def wait_event(self, method: str) -> None:
        while method not in self._events:
            message = msgspec.json.decode(await self._ws.get_message())
            if "method" in message:
                self._events.append(message["method"])
        self._events.remove(method)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


async def devtools_port(stderr: trio.abc.ReceiveStream) -> int:
    """Chromium says where DevTools listens on its stderr: wait for that line."""
    seen = b""
    while b"DevTools listening on ws://" not in seen or not seen.endswith(b"\n"):
        chunk = await stderr.receive_some(4096)
        assert chunk, f"chromium exited: {seen.decode(errors='replace')[-500:]}"
        seen += chunk
    line = seen.split(b"DevTools listening on ws://", 1)[1].split(b"\n", 1)[0]
    return int(line.split(b"/", 1)[0].rsplit(b":", 1)[1])


async def test_market_page_in_a_browser(nursery: trio.Nursery, tmp_path: Path) -> None:
    market = Market(seed=5, rate=4.0)
    running = await start_simulated(nursery, market)
    nursery.start_soon(feed(running, market))
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path}", "about:blank"]
    browser = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        with trio.fail_after(60):
            assert browser.stderr is not None
            port = await devtools_port(browser.stderr)
            nursery.start_soon(_drain, browser.stderr)
            async with httpx.AsyncClient() as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with trio_websocket.open_websocket_url(
                page["webSocketDebuggerUrl"], max_message_size=16 * 1024 * 1024
            ) as ws:
                tools = DevTools(ws)
                await tools.call("Page.enable")
                await tools.call("Page.navigate", url=f"{running.http_url}/")
                await tools.wait_event("Page.loadEventFired")
                # log in at once, before the page is live: the click must not be lost
                token = msgspec.json.encode(running.token("1001")).decode()
                lines = await tools.evaluate(PRIVATE % token)
                assert await tools.evaluate(LIVE) is True
                assert all('"uid":"1001"' in line for line in lines if line.startswith("@"))
    finally:
        browser.kill()
        with trio.CancelScope(shield=True):
            await browser.wait()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Keep reading Chromium's stderr so that it never blocks on a full pipe."""
    while await stream.receive_some(4096):
        pass
