#!/usr/bin/env python3
"""The `websockets` library's broadcast() server: the Python peer of scripts/bench.py.

What a Python team would write by hand: subscribers connect to ``/sub``; a publisher connects to
``/pub`` and every message it sends is broadcast to all subscribers. No compression (pushd and
nchan do not compress either).

    python scripts/peers/ws_broadcast.py PORT
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(port: int) -> None:
    subscribers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == "/pub":
            async for message in ws:
                broadcast(subscribers, message)
            return
        subscribers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)

    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        max_size=None,
        ping_interval=None,
        backlog=4096,
    ):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
