"""The soak's legitimate traffic: public and private subscribers that check everything they get,
and a backend publishing over the HTTP API.

A subscriber keeps the last seq of every stream (from the subscribe reply's ``streams`` on) and
a local book per symbol (``pushd.market.depth.LocalBook``: update-id chain and checksum). A seq
jump the server did not announce (resync notice, resync state, new epoch) is a gap; an event the
attacker forged (tagged, see soak_common) reaching a client is counted apart. A connection the
server ends is counted with its close code and opened again.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import httpx
import msgspec
import trio
import trio_websocket
from soak_common import (
    BATCH_HEAD_TAG,
    FORGED_ORDER_TAG,
    FORGED_TRADE_QTY,
    PRIVATE_STREAMS,
    SYMBOLS,
    UIDS,
    LegitTally,
    Target,
)

from pushd.auth import issue_hmac_token
from pushd.market.depth import DepthEvent, LocalBook

NOTICE_PAD = 6000  # bytes of padding per notice: history soon outgrows an outbound buffer
NOTICE_EVERY_S = 0.25
ACCOUNT_EVERY_S = 1.0

_decode = msgspec.json.Decoder().decode


class Stream:
    """One subscriber's view of one channel."""

    __slots__ = ("book", "epoch", "fresh", "recent", "seq", "want_snapshot")

    def __init__(self) -> None:
        self.fresh = False  # seq is the subscribe reply's: the next may be at or below it
        self.seq: int | None = None
        self.epoch: str | None = None
        self.book: LocalBook | None = None
        self.want_snapshot = False
        self.recent: deque[str] = deque(maxlen=6)  # what came last, for a failure's story


class Subscriber:
    """One legitimate connection: optional login, a fixed set of channels, every event checked."""

    def __init__(self, target: Target, tally: LegitTally, channels: list[str],
                 uid: str | None = None) -> None:  # fmt: skip
        self.target, self.tally, self.channels, self.uid = target, tally, channels, uid
        self.streams: dict[str, Stream] = {}
        self.name = f"uid {uid}" if uid else "public"
        self.connected = False
        self.resubscribe: set[str] = set()  # depth channels to subscribe to again
        self._ids = 0

    async def run(self) -> None:
        """Until cancelled: connect, subscribe, check; a close by the server is counted and the
        connection opened again (fresh streams: what went before is not held against it)."""
        while True:
            try:
                await self._session()
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                self.tally.closed[f"{self.name}: close {reason.code if reason else '?'}"] += 1
            except (OSError, trio_websocket.HandshakeError) as exc:
                self.tally.closed[f"{self.name}: {type(exc).__name__}"] += 1
            except Exception as exc:  # what the server sent broke this client: said, not fatal
                self.tally.errors[f"{self.name}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
            self.connected = False
            await trio.sleep(0.5)

    async def _session(self) -> None:
        async with trio_websocket.open_websocket_url(
            self.target.ws_url, max_message_size=1 << 22
        ) as ws:
            self.streams, self.resubscribe = {}, set()
            if self.uid is not None:
                token = issue_hmac_token(
                    self.target.hmac_secret, self.uid, 86_400
                )  # outlives any soak
                await ws.send_message(msgspec.json.encode({"op": "auth", "token": token}).decode())
                reply = _decode(await ws.get_message())
                if reply.get("result") is not True:
                    self.tally.errors[f"login refused: {reply}"] += 1
                    return
            await self._subscribe(ws, self.channels)
            self.connected = True
            self.tally.poke()
            while True:
                self._see(_decode(await ws.get_message()))
                while self.resubscribe:  # one at a time: a reply is awaited by its id
                    name = self.resubscribe.pop()
                    await ws.send_message(
                        msgspec.json.encode({"op": "unsubscribe", "channel": name}).decode()
                    )
                    self.streams.pop(name, None)
                    await self._subscribe(ws, [name])

    async def _subscribe(self, ws: trio_websocket.WebSocketConnection, channels: list[str]) -> None:
        self._ids += 1
        request_id = self._ids
        await ws.send_message(
            msgspec.json.encode({"op": "subscribe", "channel": channels, "id": request_id}).decode()
        )
        # events of channels already held may come first: the reply is the one with our id
        while True:
            message = _decode(await ws.get_message())
            if message.get("id") == request_id:
                break
            self._see(message)
        if message.get("result") is not True:
            self.tally.errors[f"subscribe refused: {message.get('code')}"] += 1
            return
        for name, at in message.get("streams", {}).items():
            stream = self.streams.setdefault(name, Stream())
            stream.seq, stream.epoch, stream.fresh = at["seq"], at["epoch"], True
            stream.recent.append(f"reply {at['seq']}")
            if name.endswith("@depth"):
                stream.book, stream.want_snapshot = LocalBook(), True

    def _see(self, message: dict[str, Any]) -> None:
        name = message.get("event")
        if not isinstance(name, str):
            return  # a reply
        stream = self.streams.setdefault(name, Stream())
        kind = name.split("@", 1)[-1] if "@" in name else name
        seq, epoch = message.get("seq"), message.get("epoch")
        if message.get("resync"):
            self.tally.resyncs[f"{'private' if name.startswith('@') else 'public'} {kind}"] += 1
            stream.seq, stream.epoch = seq, epoch
            stream.recent.append(f"resync {seq}")
            if "data" not in message:  # a notice: nothing to go on with
                if name.endswith("@depth"):  # a gateway has no book: subscribe again
                    self.resubscribe.add(name)  # (maybe after another channel's reply)
                    stream.want_snapshot = True  # till then, diffs have nothing to apply to
                return
        elif epoch != stream.epoch and stream.epoch is not None:
            self.tally.resyncs[f"new epoch {kind}"] += 1
        elif stream.want_snapshot:
            pass  # (re)subscribed to depth: the chain starts again at the snapshot
        elif stream.seq is not None and seq != stream.seq + 1:
            # after a subscribe reply saying N, a state (or a replay) may start at or below N
            state_on_subscribe = stream.fresh and seq <= stream.seq
            if not state_on_subscribe:
                data = message.get("data")
                shape = (
                    {k: data.get(k) for k in ("e", "U", "u", "pu")}
                    if isinstance(data, dict)
                    else ""
                )
                at = trio.current_time() - self.tally.t0
                self.tally.gaps.append(f"{self.name} {name}: seq {stream.seq} -> {seq} {shape}"
                                       f" at {at:.0f} s")  # fmt: skip
        stream.seq, stream.epoch, stream.fresh = seq, epoch, False
        data = message.get("data")
        genuine = True  # the stream's silence is judged on the engine's own events only
        if kind == "depth":
            self._depth(stream, name, data)
        elif kind == "trades":
            trades = data.get("trades", ())
            forged = sum(1 for t in trades if t.get("qty") == FORGED_TRADE_QTY)
            if forged:
                self.tally.forged["trades"] += forged
            genuine = forged < len(trades) or not trades
        elif kind == "order" and isinstance(data, dict):
            if data.get("client_order_id") == FORGED_ORDER_TAG:
                self.tally.forged["order"] += 1
                genuine = False
            if data.get("uid") != self.uid:
                self.tally.forged[f"order of uid {data.get('uid')} to uid {self.uid}"] += 1
        elif name == "notice" and isinstance(data, dict) and data.get("tag") == BATCH_HEAD_TAG:
            self.tally.forged["notice from a batch that was refused"] += 1
        self.tally.saw(kind if genuine else f"{kind} (forged)")

    def _depth(self, stream: Stream, name: str, data: Any) -> None:
        event = msgspec.convert(data, DepthEvent)
        stream.recent.append(f"{'W' if stream.want_snapshot else ''}{stream.seq}:{event.e[0]}"
                             f" {event.U}-{event.u} pu {event.pu}")  # fmt: skip
        if stream.book is None:
            stream.book, stream.want_snapshot = LocalBook(), True
        if stream.want_snapshot:
            if event.e != "snapshot":
                return  # diffs before the snapshot of a resubscribe: nothing to apply them to
            stream.want_snapshot = False
        try:
            stream.book.apply(event)
        except ValueError as exc:
            story = " | ".join(stream.recent)
            self.tally.book_errors.append(f"{self.name} {name}: {exc} after: {story}")
            self.resubscribe.add(name)  # what a client does: a fresh snapshot
            stream.want_snapshot = True


def subscribers(target: Target, tally: LegitTally, public: int = 2) -> list[Subscriber]:
    """``public`` readers of every symbol's depth and trades and the notices, and one private
    reader per simulated user."""
    channels = [f"{s}@{k}" for s in SYMBOLS for k in ("depth", "trades")] + ["notice"]
    readers = [Subscriber(target, tally, channels) for _ in range(public)]
    readers += [Subscriber(target, tally, list(PRIVATE_STREAMS), uid) for uid in UIDS]
    return readers


async def backend(target: Target, tally: LegitTally) -> None:
    """The exchange's backend: notices (big enough that a minute of them outgrows a client's
    outbound buffer) and account updates of the simulated users, until cancelled."""
    pad = "n" * NOTICE_PAD
    n = 0
    async with httpx.AsyncClient(base_url=target.api, headers=target.auth_header,
                                 timeout=10) as client:  # fmt: skip
        next_account = trio.current_time()
        while True:
            n += 1
            await _post(client, tally, "/v1/publish",
                        {"channel": "notice", "data": {"n": n, "pad": pad}})  # fmt: skip
            if trio.current_time() >= next_account:
                next_account += ACCOUNT_EVERY_S
                messages = [{"channel": f"user_{uid}_account",
                             "data": {"uid": uid, "fields": {"tier": str(n % 7)}}}
                            for uid in UIDS]  # fmt: skip
                await _post(client, tally, "/v1/publish/batch", {"messages": messages})
            await trio.sleep(NOTICE_EVERY_S)


async def _post(client: httpx.AsyncClient, tally: LegitTally, path: str, body: Any) -> None:
    try:
        r = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        tally.errors[f"publish: {type(exc).__name__}"] += 1
        return
    if r.status_code != 200:
        tally.errors[f"publish: HTTP {r.status_code}"] += 1
        return
    tally.published[path] += 1
