"""What the soak's parts share: the target's addresses and secrets, the tallies, raw frames."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from wsframes import ZERO_MASK, client_frame  # tests/ is on the path (soak.py)

FORGED_ORDER_TAG = "soak-forged"  # client_order_id of every order event the attacker forges
FORGED_TRADE_QTY = "0.0000001337"  # qty of every trade it forges (the simulator never has it)
BATCH_HEAD_TAG = "soak-batch-head"  # the valid first item of a batch whose second is invalid
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
UIDS = ("1001", "1002", "1003", "1004", "1005")  # the simulated engine's users
PRIVATE_STREAMS = ("@order", "@balance", "@position", "@account")


@dataclass
class Target:
    """One running ``pushd run --workers 2`` and what a client, a backend or an attacker needs."""

    dir: Path
    config_path: Path
    ws_port: int
    http_port: int  # the compute process's API; gateway i serves http_port + i
    udp_port: int
    tcp_port: int
    snapshot_port: int
    publish_token: str
    hmac_secret: str
    redis_password: str
    engine_keys: dict[int, str]  # the simulated engine's per-source keys (ingest sealing)
    supervisor_pid: int = 0
    logs: LogWatch | None = None  # the supervisor's (and so every child's) log lines

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth_header(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.publish_token}"}

    @property
    def secrets(self) -> dict[str, str]:
        return {
            "publish token": self.publish_token,
            "hmac secret": self.hmac_secret,
            "redis password": self.redis_password,
            **{f"engine key {src}": key for src, key in self.engine_keys.items()},
        }


@dataclass
class AttackTally:
    """What one attacker sent, how the server answered, and the answers the issue calls wrong."""

    name: str
    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        self.failures[why] += 1


@dataclass
class LegitTally:
    """What the legitimate clients got: events per stream kind, and every way it went wrong."""

    events: Counter[str] = field(default_factory=Counter)
    resyncs: Counter[str] = field(default_factory=Counter)  # announced by the server
    gaps: list[str] = field(default_factory=list)  # seq jumps nobody announced
    book_errors: list[str] = field(default_factory=list)  # broken depth chain or checksum
    forged: Counter[str] = field(default_factory=Counter)  # attacker's events that arrived
    closed: Counter[str] = field(default_factory=Counter)  # legit connections the server ended
    errors: Counter[str] = field(default_factory=Counter)  # refused logins, failed publishes
    published: Counter[str] = field(default_factory=Counter)
    last_at: dict[str, float] = field(default_factory=dict)  # per kind, trio time
    longest_silence: dict[str, float] = field(default_factory=dict)  # after warm-up
    progress: trio.Event = field(default_factory=trio.Event)  # set (and replaced) on news
    t0: float = field(default_factory=trio.current_time)

    def saw(self, kind: str) -> None:
        self.events[kind] += 1
        self.last_at[kind] = trio.current_time()
        self.poke()

    def poke(self) -> None:
        self.progress.set()
        self.progress = trio.Event()


class LogWatch:
    """A process's JSON log lines as they come (read by ``follow``), the children it says it
    started, and any configured secret seen in any line."""

    def __init__(self, secrets: dict[str, str], copy: Path | None = None) -> None:
        self.copy = copy  # every byte read is appended here too
        self.lines: list[dict[str, Any]] = []
        self.children: dict[str, int] = {}  # name -> pid, from "child started"
        self.starts: Counter[str] = Counter()
        self.leaked: Counter[str] = Counter()
        self.unstructured: list[str] = []  # lines that are not JSON (tracebacks)
        self.ready = 0
        self.changed = trio.Event()
        self._secrets = {k: v.encode() for k, v in secrets.items() if v}

    async def follow(self, stream: trio.abc.ReceiveStream) -> None:
        rest = b""
        with open(self.copy or os.devnull, "ab") as copy:  # noqa: ASYNC230 (local disk)
            while chunk := await stream.receive_some(1 << 16):
                copy.write(chunk)
                *complete, rest = (rest + chunk).split(b"\n")
                for raw in complete:
                    self._line(raw)
        if rest:
            self._line(rest)

    def _line(self, raw: bytes) -> None:
        for name, secret in self._secrets.items():
            if secret in raw:
                self.leaked[name] += 1
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):  # a traceback, most likely
            if raw.strip():
                self.unstructured.append(raw.decode(errors="replace")[:160])
            return
        self.lines.append(line)
        event = line.get("event")
        if event == "child started":
            self.children[str(line.get("child"))] = int(line.get("pid", 0))
            self.starts[str(line.get("child"))] += 1
        elif event == "pushd ready":
            self.ready += 1
        self.changed.set()
        self.changed = trio.Event()


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A client frame built by hand (``wsframes``), with a zero mask key: floods stay cheap."""
    return client_frame(opcode, payload, fin=fin, mask_key=ZERO_MASK)


TEXT, CONTINUATION, CLOSE, PING = 0x1, 0x0, 0x8, 0x9
