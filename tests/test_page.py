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
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
import trio_websocket
from conftest import SECRET, pushd_process, ready_ports

from pushd.daemon import Ports

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--remote-allow-origins=*",
]  # fmt: skip


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


def demo_config(tmp_path: Path, websocket: int = 0, http: int = 0) -> Path:
    """The first demo binds ports the kernel picks; a restarted one the same WebSocket and HTTP
    ports, so that the page finds it again."""
    path = tmp_path / "demo.toml"
    path.write_text(
        f"[websocket]\nport = {websocket}\n[http]\nport = {http}\n"
        "[ingest]\ntcp_port = 0\nudp_port = 0\n"
        '[engine]\nsnapshot_port = 0\n[log]\nformat = "json"\n'
        f'[auth.hmac]\nsecret = "{SECRET}"\n'  # a login outlives a restart
        "[binance.spot]\nport = 0\n[binance.futures]\nport = 0\n"  # a demo serves both
    )
    return path


@asynccontextmanager
async def demo(config: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[trio.Process, Ports]]:
    """``pushd demo`` (one hour of history: quick), and the ports it bound."""
    command = [sys.executable, "-m", "pushd", "demo", "--config", str(config), "--history-h", "1"]
    async with pushd_process(command) as (process, logs):
        assert process.stderr is not None
        nursery.start_soon(_drain, process.stderr)  # a full pipe would stop the demo
        yield process, ready_ports(logs)


@asynccontextmanager
async def browser(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[DevTools]:
    """Headless Chromium with one page, driven over DevTools."""
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "about:blank"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        port = await devtools_port(process.stderr)
        nursery.start_soon(_drain, process.stderr)
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with trio_websocket.open_websocket_url(
            page["webSocketDebuggerUrl"], max_message_size=16 * 1024 * 1024
        ) as ws:
            yield DevTools(ws)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


# Each of these resolves inside the page once what it waits for has happened: the page calls
# ``window.pushdPage``'s hooks or the test re-checks on every animation frame (no sleeps).
UNTIL = """(test) => new Promise((resolve) => {
  const check = () => { const v = test(); v ? resolve(v) : requestAnimationFrame(check); };
  check();
})"""

BOOK_EQUALS_REST = f"""(async () => {{
  const page = window.pushdPage, seen = new Map();
  const until = {UNTIL};
  page.bookListeners.add((book) => seen.set(book.u, JSON.stringify(
    [book.levels("bids", 100), book.levels("asks", 100)])));
  await until(() => seen.size >= 3);
  const rest = await (await fetch(`/v1/depth?symbol=${{page.symbol}}&limit=100`)).json();
  await until(() => seen.has(rest.data.u));
  const shown = document.querySelectorAll("#bids tr, #asks tr").length;
  return {{same: seen.get(rest.data.u) === JSON.stringify([rest.data.bids, rest.data.asks]),
          u: rest.data.u, shown, resyncs: page.resyncs.length}};
}})()"""

CHART = f"""(async () => {{
  const page = window.pushdPage, until = {UNTIL};
  await until(() => page.candles.length > 0);
  const history = page.candles.filter((c) => c.closed).length;
  const first = page.liveUpdates, last = JSON.stringify(page.candles.at(-1));
  await until(() => page.liveUpdates >= first + 2 && JSON.stringify(page.candles.at(-1)) !== last);
  return {{history, open: page.candles.at(-1).closed === false,
          drawn: document.querySelectorAll("#chart canvas").length}};
}})()"""

ACCOUNT = f"""(async () => {{
  const until = {UNTIL};
  await until(() => !document.getElementById("demo-login").hidden);
  document.getElementById("demo-login").click();
  await until(() => document.querySelectorAll("#balances tr").length > 0
    && document.querySelectorAll("#orders tr, #fills tr").length > 0);
  return {{who: document.getElementById("who").textContent,
          uids: [...window.pushdPage.orders.values(), ...window.pushdPage.fills].map((o) => o.uid),
          balances: document.querySelectorAll("#balances tr").length}};
}})()"""

STATUS = """(async () => {{
  const until = {until};
  return await until(() => document.getElementById("status").textContent.startsWith({state})
    && document.getElementById("status").textContent);
}})()"""

AFTER_RESTART = f"""(async () => {{
  const page = window.pushdPage, until = {UNTIL};
  await until(() => page.recoveries.length > 0 && page.book && page.book.u !== null
    && document.querySelectorAll("#bids tr").length >= 10);
  return {{recovery: page.recoveries.at(-1), note: document.getElementById("note").textContent,
          u: page.book.u}};
}})()"""


async def test_market_page_in_a_browser(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The page against a real ``pushd demo``: the book equals the REST snapshot at the same
    update id, the chart has history and a live candle that moves, the demo login fills the
    account panels, and a killed and restarted daemon shows "reconnecting" then live data."""
    config = demo_config(tmp_path)
    async with browser(tmp_path, nursery) as tools:
        with trio.fail_after(90):
            async with demo(config, nursery) as (process, ports):
                url = f"http://127.0.0.1:{ports.http}"
                await tools.call("Page.enable")
                await tools.call("Page.navigate", url=f"{url}/")
                await tools.wait_event("Page.loadEventFired")
                assert await tools.evaluate(STATUS.format(until=UNTIL, state='"live"')) == "live"
                book = await tools.evaluate(BOOK_EQUALS_REST)
                assert book["same"] is True, book
                assert book["shown"] >= 20 and book["resyncs"] == 0, book
                chart = await tools.evaluate(CHART)
                assert chart["history"] >= 50, chart  # an hour of 1m candles from the start
                assert chart["open"] is True and chart["drawn"] > 0, chart
                account = await tools.evaluate(ACCOUNT)
                assert account["who"] == "logged in as 1001", account
                assert account["uids"] and set(account["uids"]) == {"1001"}, account
                process.kill()  # the daemon dies: the page says so and keeps trying
                await process.wait()
                shown = await tools.evaluate(STATUS.format(until=UNTIL, state='"reconnecting"'))
                assert shown.startswith("reconnecting"), shown
            config = demo_config(tmp_path, ports.websocket, ports.http)  # the same ports
            async with demo(config, nursery):  # the page finds it again
                assert await tools.evaluate(STATUS.format(until=UNTIL, state='"live"')) == "live"
                after = await tools.evaluate(AFTER_RESTART)
                # a new daemon: a new epoch on every stream, so nothing could be replayed and
                # the page says it reloaded them
                assert after["recovery"]["reloaded"], after
                assert "reloaded" in after["note"], after


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Keep reading Chromium's stderr so that it never blocks on a full pipe."""
    while await stream.receive_some(4096):
        pass
