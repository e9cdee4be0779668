"""What a reload (SIGHUP) may change in a running daemon, decided without I/O.

A reload must never drop a connection, so only settings that the running services read afresh
change live: logins (keys, secrets, verifier), limits, the log level, the WebSocket admission
rules (origins, connection caps, handshake rate), the publish token and batch size, the market
timers' intervals, and the TLS certificate files (re-read even when the paths are the same).
Everything else (ports, hosts, role, bus, ingest, engine, the set of symbols, funding maths)
needs a restart: a reload keeps its running value and names the key in its log line.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import msgspec

from pushd import config as config_mod
from pushd.config import Config

LIVE = (
    "auth.*",
    "limits.*",
    "log.level",
    "websocket.allowed_origins",
    "websocket.max_connections",
    "websocket.max_connections_per_ip",
    "websocket.handshakes_per_second",
    "websocket.tls.*",
    "http.publish_token",
    "http.max_batch",
    "http.tls.*",
    "markets.*.depth_interval_ms",
    "markets.*.trades_interval_ms",
    "markets.*.ticker_interval_ms",
    "markets.*.kline_interval_ms",
    "markets.*.mark_interval_ms",
)


class Reload(msgspec.Struct, frozen=True):
    """The config to run with from now on, and which changed keys it took or left."""

    config: Config
    applied: list[str]
    refused: list[str]  # changed in the file, need a restart: the running value stays


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; a table present on one side only is one key."""
    keys: list[str] = []
    for key in sorted(old.keys() | new.keys()):
        path = f"{prefix}{key}"
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            keys += changed_keys(before, after, f"{path}.")
        elif before != after or (key in old) != (key in new):
            keys.append(path)
    return keys


def is_live(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``key`` may change now. TLS files may; turning TLS on or off may not (a
    listener is plain or TLS from its start)."""
    if not any(fnmatch.fnmatchcase(key, pattern) for pattern in LIVE):
        return False
    section = key.split(".")[0]
    if key.startswith(f"{section}.tls."):
        return bool(old[section]["tls"]["certificate"]) == bool(new[section]["tls"]["certificate"])
    return True


def plan(running: Config, wanted: Config) -> Reload:
    """The running config with every live change of ``wanted`` applied (checked again)."""
    old, asked = msgspec.to_builtins(running), msgspec.to_builtins(wanted)
    new = msgspec.to_builtins(wanted)  # asked, with each refused key put back
    applied, refused = [], []
    for key in changed_keys(old, asked):
        if is_live(key, old, asked):
            applied.append(key)
            continue
        refused.append(key)
        _put(new, key, old)
    return Reload(config_mod.from_dict(new, source="reload"), applied, refused)


def _put(target: dict[str, Any], key: str, source: dict[str, Any]) -> None:
    """Set ``key`` in ``target`` to its value in ``source`` (or remove it if absent there)."""
    *parents, last = key.split(".")
    for part in parents:
        target, source = target[part], source[part]
    if last in source:
        target[last] = source[last]
    else:
        del target[last]
