"""Which WebSocket paths a Binance surface serves, and what each asks for. No I/O.

- ``/ws`` and ``/ws/<n>`` (ccxt appends a connection index): raw payloads, no stream yet;
- ``/ws/<streamName>``: raw payloads, that stream subscribed from the start;
- ``/stream`` and ``/stream?streams=a/b/c``: payloads wrapped ``{"stream":..,"data":..}``,
  those streams subscribed from the start;
- each under the USD-M routed prefixes ``/public`` and ``/market`` too (ccxt and
  python-binance build them), on either surface; anything after the last known segment is
  tolerated (``/ws/0/extra``).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import msgspec

PREFIXES = ("/public", "/market")


class Opening(msgspec.Struct, frozen=True):
    """What a connection's path asks for: the payload form and the streams to start with."""

    combined: bool
    streams: list[str]


def _parts(path: str) -> list[str]:
    for prefix in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            path = path[len(prefix) :]
            break
    return [p for p in path.split("/") if p]


def accepts(path: str) -> bool:
    """Whether ``path`` (no query) is one of the surface's WebSocket paths."""
    parts = _parts(path)
    return bool(parts) and parts[0] in ("ws", "stream")


def opening(target: str) -> Opening:
    """The payload form and streams of an accepted request target (path and query)."""
    split = urlsplit(target)
    parts = _parts(split.path)
    if parts and parts[0] == "stream":
        values = parse_qs(split.query).get("streams", [])
        names = [n for value in values for n in value.split("/") if n]
        return Opening(combined=True, streams=names)
    if len(parts) > 1 and "@" in parts[1]:  # /ws/<streamName>; /ws/<n> is an index
        return Opening(combined=False, streams=[parts[1]])
    return Opening(combined=False, streams=[])
