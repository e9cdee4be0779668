"""The soak's attackers: one task per item of issue 18 that can be driven from outside.

Every attacker is bounded in rate, count and time (it stops at ``until``) and talks to
loopback only. Each records what it sent and how the server answered in its ``AttackTally``,
and calls ``fail`` for an answer the issue names as wrong (a flood never cut, a replay answered
with 4002, an invalid body answered 200, ...). What an attack does to everybody else (a process
restarted, RSS, a forged event reaching a client, a stream gone silent) is judged by soak.py.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec
import trio
import trio_websocket
from conftest import RawClient
from soak_common import (
    BATCH_HEAD_TAG,
    CONTINUATION,
    FORGED_ORDER_TAG,
    FORGED_TRADE_QTY,
    PING,
    TEXT,
    UIDS,
    AttackTally,
    Target,
    ws_frame,
)
from wsproto.events import AcceptConnection, CloseConnection, Pong, RejectConnection

from ingest import wire
from pushd.auth import issue_hmac_token

Attack = Callable[[Target, AttackTally, float], Awaitable[None]]
U64_MAX = 2**64 - 1


class Ending:
    """How the server ended one raw connection: a close frame's code, EOF, or a reset."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.how = ""
        self.pongs = 0
        self.texts = 0


async def _open(target: Target, tally: AttackTally) -> RawClient | None:
    """An upgraded raw connection, or None (the refusal is recorded as the answer)."""
    try:
        client = await RawClient.connect(target.ws_port)
        answer = await client.handshake()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        tally.answers[f"connect: {type(exc).__name__}"] += 1
        return None
    if isinstance(answer, RejectConnection):
        tally.answers[f"upgrade refused: HTTP {answer.status_code}"] += 1
        await client.aclose()
        return None
    assert isinstance(answer, AcceptConnection)
    return client


async def _watch(client: RawClient, ending: Ending) -> None:
    """Read everything the server sends until it ends the connection; note how it did."""
    try:
        while True:
            data = await client.stream.receive_some(1 << 16)
            if not data:
                ending.how = "EOF without a close frame"
                break
            client.ws.receive_data(data)
            for event in client.ws.events():
                if isinstance(event, Pong):
                    ending.pongs += 1
                elif isinstance(event, CloseConnection):
                    ending.how = f"close {event.code}"
                else:
                    ending.texts += 1
            if ending.how:
                break
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        ending.how = ending.how or "reset"
    except Exception as exc:  # wsproto refusing what the server sent is an answer too
        ending.how = f"unreadable: {type(exc).__name__}"
    ending.done.set()


async def _flood(target: Target, tally: AttackTally, until: float, *, opening: bytes,
                 frame: bytes, what: str, per_second: int, most: int) -> None:  # fmt: skip
    """Connections that each send ``frame`` at ``per_second`` after ``opening``, up to ``most``
    frames; the server must end each flood (a close code) before ``most``."""
    batch = max(1, per_second // 20)
    chunk = frame * batch
    while trio.current_time() < until - 3:
        client = await _open(target, tally)
        if client is None:
            await trio.sleep(1)
            continue
        ending, sent = Ending(), 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, client, ending)
            try:
                if opening:
                    await client.send_raw(opening)
                while sent < most and not ending.done.is_set() and trio.current_time() < until:
                    await client.send_raw(chunk)
                    sent += batch
                    tally.sent[what] += batch
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            with trio.move_on_after(3):
                await ending.done.wait()
            nursery.cancel_scope.cancel()
        await client.aclose()
        tally.sent["connections"] += 1
        if ending.pongs:
            tally.answers["pongs"] += ending.pongs
        if ending.how:
            tally.answers[f"{ending.how} after ~{_bucket(sent)} {what}"] += 1
        elif sent >= most:
            tally.answers[f"never cut: {most} {what} taken"] += 1
            tally.fail(f"a connection sent {most} {what} at {per_second}/s and was not closed")
        await trio.sleep(0.5)


def _bucket(n: int) -> str:
    """A round figure for the table (1, 10, 100, ...)."""
    return "0" if n <= 0 else f"{10 ** (len(str(n)) - 1):,}+"


async def continuation_flood(target: Target, tally: AttackTally, until: float) -> None:
    """Item 4: a started text message, then empty continuation frames, never finished."""
    await _flood(target, tally, until, opening=ws_frame(TEXT, b'{"op":', fin=False),
                 frame=ws_frame(CONTINUATION, fin=False), what="empty continuations",
                 per_second=2000, most=20_000)  # fmt: skip


async def ping_flood(target: Target, tally: AttackTally, until: float) -> None:
    """Item 5: WebSocket ping frames as fast as the rate limit here lets them go."""
    await _flood(target, tally, until, opening=b"", frame=ws_frame(PING, b"soak"),
                 what="pings", per_second=1000, most=15_000)  # fmt: skip


async def oversize_frames(target: Target, tally: AttackTally, until: float) -> None:
    """Frames over ``limits.max_message_bytes``: one big frame, a header claiming 2^40 bytes,
    a message of many 1 KiB fragments, a big binary frame. Each must be closed with 1009."""
    kinds: list[tuple[str, bytes]] = [
        ("64 KiB text frame", ws_frame(TEXT, b"x" * 65536)),
        ("header of 2^40 bytes, 8 KiB sent", bytes([0x81, 0xFF]) + (1 << 40).to_bytes(8, "big")
         + b"\0" * 4 + b"x" * 8192),
        ("40 fragments of 1 KiB", ws_frame(TEXT, b"x" * 1024, fin=False)
         + ws_frame(CONTINUATION, b"x" * 1024, fin=False) * 39),
        ("64 KiB binary frame", ws_frame(0x2, b"\0" * 65536)),
    ]  # fmt: skip
    turn = 0
    while trio.current_time() < until - 3:
        what, data = kinds[turn % len(kinds)]
        turn += 1
        client = await _open(target, tally)
        if client is None:
            await trio.sleep(1)
            continue
        ending = Ending()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, client, ending)
            try:
                await client.send_raw(data)
                tally.sent[what] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            with trio.move_on_after(3):
                await ending.done.wait()
            nursery.cancel_scope.cancel()
        await client.aclose()
        tally.answers[f"{what}: {ending.how or 'nothing in 3 s'}"] += 1
        if not ending.how:
            tally.fail(f"{what} left the connection open")
        await trio.sleep(1)


async def bad_tokens(target: Target, tally: AttackTally, until: float) -> None:
    """Item 15's burst, on the HMAC verifier: connections sending a dozen bad logins each."""
    wrong = issue_hmac_token("not-the-secret", "1001", 600)
    expired = issue_hmac_token(target.hmac_secret, "1001", -60)
    alg_none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMDAxIn0."
    tokens = ["", "x", "a.b.c", wrong, expired, alg_none, "t" * 3000, wrong[:-2] + "AA",
              "\u00e9\u00e9", expired + "x", "1001", "null"]  # fmt: skip
    while trio.current_time() < until - 3:
        try:
            async with trio_websocket.open_websocket_url(target.ws_url) as ws:
                tally.sent["connections"] += 1
                for token in tokens:
                    await ws.send_message(
                        msgspec.json.encode({"op": "auth", "token": token}).decode()
                    )
                    tally.sent["bad logins"] += 1
                    with trio.fail_after(5):
                        reply = msgspec.json.decode(await ws.get_message())
                    if reply.get("result") is True:
                        tally.answers["ACCEPTED"] += 1
                        tally.fail(f"a bad token logged in: {token[:20]!r}")
                    else:
                        tally.answers[f"error {reply.get('code')}"] += 1
                        if reply.get("code") in (1, 11):
                            tally.fail(f"a bad token got error {reply.get('code')}")
        except trio_websocket.ConnectionClosed as exc:
            tally.answers[f"close {exc.reason.code if exc.reason else '?'}"] += 1
        except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
            tally.answers[type(exc).__name__] += 1
        await trio.sleep(1)


async def reconnect_storm(target: Target, tally: AttackTally, until: float) -> None:
    """Every 4 s, 60 clients connect, subscribe and go (half without a close frame), 20 at once."""
    limit = trio.CapacityLimiter(20)
    subscribe = {"op": "subscribe", "channel": ["BTCUSDT@depth", "BTCUSDT@trades"]}

    async def one(i: int) -> None:
        async with limit:
            client = await _open(target, tally)
            if client is None:
                return
            try:
                await client.send_json(subscribe)
                _, code = await client.read_one_batch()
                tally.answers["accepted and subscribed" if code is None else f"close {code}"] += 1
                if i % 2:
                    await client.send_raw(ws_frame(0x8, (1000).to_bytes(2, "big")))
            except (trio.BrokenResourceError, OSError, trio.TooSlowError) as exc:
                tally.answers[type(exc).__name__] += 1
            finally:
                await client.aclose()

    while trio.current_time() < until - 5:
        async with trio.open_nursery() as nursery:
            for i in range(60):
                tally.sent["connections"] += 1
                nursery.start_soon(one, i)
        await trio.sleep(4)


async def since_replay(target: Target, tally: AttackTally, until: float) -> None:
    """Item 11: ``since`` far back in a big history (notices of ~6 KiB each, trades): the reply
    must come, then the replay or ``recovered:false``; never 4002."""
    turn = 0
    while trio.current_time() < until - 10:
        channel = ("notice", "BTCUSDT@trades")[turn % 2]
        turn += 1
        try:
            async with trio_websocket.open_websocket_url(
                target.ws_url, max_message_size=1 << 22
            ) as ws:
                tally.sent["connections"] += 1
                await _replay_once(ws, channel, tally)
        except trio_websocket.ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else None
            tally.answers[f"{channel}: close {code}"] += 1
            if code == 4002:
                tally.fail("a since replay was answered with 4002 (reconnect and recover: loops)")
        except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
            tally.answers[f"{channel}: {type(exc).__name__}"] += 1
        await trio.sleep(5)


async def _replay_once(ws: trio_websocket.WebSocketConnection, channel: str,
                       tally: AttackTally) -> None:  # fmt: skip
    async def call(request: dict[str, Any]) -> dict[str, Any]:
        await ws.send_message(msgspec.json.encode(request).decode())
        with trio.fail_after(10):
            while True:
                reply: dict[str, Any] = msgspec.json.decode(await ws.get_message())
                if reply.get("id") == request["id"]:
                    return reply

    first = await call({"op": "subscribe", "channel": channel, "id": 1})
    [(name, at)] = first["streams"].items()
    await call({"op": "unsubscribe", "channel": channel, "id": 2})
    since = {"seq": max(0, at["seq"] - 190), "epoch": at["epoch"]}
    await ws.send_message(msgspec.json.encode(
        {"op": "subscribe", "channel": channel, "since": since, "id": 3}).decode())  # fmt: skip
    tally.sent["since requests"] += 1
    replayed = size = 0
    reply: dict[str, Any] | None = None
    with trio.move_on_after(15):
        while True:
            text = await ws.get_message()
            message = msgspec.json.decode(text)
            if message.get("id") == 3:
                reply = message
                if message.get("recovered") is not True:
                    break
            elif message.get("event") == name and reply is not None:
                replayed += 1
                size += len(text)
                if message.get("seq", 0) >= reply["streams"][name]["seq"]:
                    break
    if reply is None:
        tally.answers[f"{channel}: no reply in 15 s"] += 1
        tally.fail("a since request got no reply")
    elif reply.get("recovered") is True:
        tally.answers[f"{channel}: recovered:true, {_bucket(size)} B replayed"] += 1
    else:
        tally.answers[f"{channel}: recovered:{reply.get('recovered')} "
                      f"{reply.get('reason', reply.get('msg', ''))}".strip()] += 1  # fmt: skip


async def token_expiry(target: Target, tally: AttackTally, until: float) -> None:
    """Item 14: a session on a 4 s token; its private events must stop (told, then closed)
    within 30 s of ``exp``."""
    while trio.current_time() < until - 36:
        exp = time.time() + 4
        token = issue_hmac_token(target.hmac_secret, "1001", 4)
        late = 0
        try:
            async with trio_websocket.open_websocket_url(target.ws_url) as ws:
                tally.sent["short-lived sessions"] += 1
                await ws.send_message(msgspec.json.encode({"op": "auth", "token": token}).decode())
                await ws.send_message(msgspec.json.encode(
                    {"op": "subscribe", "channel": ["@order", "@account"]}).decode())  # fmt: skip
                with trio.move_on_after(34):
                    while True:
                        message = msgspec.json.decode(await ws.get_message())
                        if time.time() > exp + 1 and message.get("event") in ("@order", "@account"):
                            late += 1
                        elif message.get("event") and not message["event"].startswith("@"):
                            tally.answers[f"told: {message['event']}"] += 1
                tally.answers[f"open 30 s after exp, {_bucket(late)} private events after exp"] += 1
                if late:
                    tally.fail("private events kept flowing 30 s after the token expired")
        except trio_websocket.ConnectionClosed as exc:
            after = time.time() - exp
            code = exc.reason.code if exc.reason else "?"
            tally.answers[f"close {code} {after:+.0f} s from exp, {late} events after"] += 1
        except (OSError, trio_websocket.HandshakeError) as exc:
            tally.answers[type(exc).__name__] += 1
        await trio.sleep(1)


async def uid_flood(target: Target, tally: AttackTally, until: float) -> None:
    """Item 10: 50,000 distinct uids published to (``user_s<n>_account``), 500 a batch, spread
    over the run; what they cost must be bounded by configuration."""
    total, per_batch = 50_000, 500
    start = trio.current_time()
    every = max(0.2, (until - 5 - start) / (total / per_batch))  # back to back if slower
    async with httpx.AsyncClient(base_url=target.api, headers=target.auth_header,
                                 timeout=30) as client:  # fmt: skip
        for first in range(0, total, per_batch):
            if trio.current_time() > until - 5:
                break
            messages = [{"channel": f"user_s{n}_account", "data": {"n": n}}
                        for n in range(first, first + per_batch)]  # fmt: skip
            try:
                r = await client.post("/v1/publish/batch", json={"messages": messages})
                tally.answers[f"HTTP {r.status_code}"] += 1
                tally.sent["uids"] += per_batch
            except httpx.HTTPError as exc:
                tally.answers[type(exc).__name__] += 1
            await trio.sleep(0.05)
            await trio.sleep_until(start + (first // per_batch + 1) * every)


async def publish_bad_utf8(target: Target, tally: AttackTally, until: float) -> None:
    """Item 2: publish bodies with invalid UTF-8 inside JSON strings, single and in batches
    after a valid item. Must be refused (4xx) before a seq is taken; never 200, never 5xx."""
    bodies: list[tuple[str, str, bytes]] = [
        ("notice data", "/v1/publish", b'{"channel":"notice","data":"\xff\xfe"}'),
        ("private data", "/v1/publish", b'{"channel":"user_1001_account","data":{"k":"\xc3("}}'),
        ("batch, bad second item", "/v1/publish/batch",
         b'{"messages":[{"channel":"notice","data":{"tag":"' + BATCH_HEAD_TAG.encode()
         + b'"}},{"channel":"notice","data":"\xed\xa0\x80"}]}'),
        ("channel name", "/v1/publish", b'{"channel":"notice\xff","data":1}'),
    ]  # fmt: skip
    turn = 0
    async with httpx.AsyncClient(base_url=target.api, timeout=10) as client:
        while trio.current_time() < until - 3:
            what, path, body = bodies[turn % len(bodies)]
            turn += 1
            headers = {**target.auth_header, "content-type": "application/json"}
            try:
                r = await client.post(path, content=body, headers=headers)
                tally.answers[f"{what}: HTTP {r.status_code}"] += 1
                if r.status_code == 200 or r.status_code >= 500:
                    tally.fail(f"invalid UTF-8 ({what}) answered HTTP {r.status_code}")
            except httpx.HTTPError as exc:
                tally.answers[f"{what}: {type(exc).__name__}"] += 1
            tally.sent["bodies"] += 1
            await trio.sleep(1)


class ForgedSource:
    """Frames as a stranger (or an impostor of a real ``src``) would send them: no key."""

    def __init__(self, src: int, epoch: int = 1) -> None:
        self.src, self.epoch, self.seq = src, epoch, 0

    def frame(self, events: list[wire.Event], *, skip: int = 0) -> bytes:
        self.seq += 1 + skip
        return wire.encode(wire.Envelope(self.src, self.epoch, self.seq, events))


async def ingest_forge(target: Target, tally: AttackTally, until: float) -> None:
    """Items 6-8: datagrams (and a TCP connection) that are not from the engine: garbage,
    wrong types, a forged trade and a forged fill (tagged, so a client that gets one says so),
    a stranger's private event followed by a seq gap, and ``epoch`` = 2^64-1 for the real
    sources 1 and 2 (the simulator's). Five rounds a second."""
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", target.udp_port)
    trade_src, fill_src, gap_src, tcp_src = (ForgedSource(s) for s in (900, 901, 902, 903))
    seq_max = ForgedSource(904)
    tcp: trio.SocketStream | None = None
    ts = int(time.time() * 1000)
    turn = 0

    async def send(what: str, datagram: bytes) -> None:
        await udp.sendto(datagram, addr)
        tally.sent[what] += 1

    with udp:
        while trio.current_time() < until - 3:
            turn += 1
            ts = int(time.time() * 1000)
            uid = random.choice(UIDS)
            fill = wire.OrderUpdate(
                uid=uid, symbol="BTCUSDT", order_id=10**12 + turn, side="buy", kind="limit",
                price="1", qty="1", filled_qty="1", avg_price="1", status="filled", ts=ts,
                client_order_id=FORGED_ORDER_TAG, last_fill_qty="1", last_fill_price="1",
            )  # fmt: skip
            trade = wire.Trade("BTCUSDT", 10**12 + turn, "1", FORGED_TRADE_QTY, "buy", ts)
            await send("garbage datagrams", os.urandom(random.randint(1, 200)))
            await send("wrong-type envelopes", msgspec.msgpack.encode(
                {"src": "x", "epoch": -1, "seq": 0, "events": [{"type": "trade"}]}))  # fmt: skip
            await send("forged trades", trade_src.frame([trade]))
            await send("forged fills", fill_src.frame([fill]))
            if turn % 5 == 0:  # a stranger's private event, then a gap: resync everyone?
                balance = wire.BalanceUpdate(f"s{turn}", "USDT", "1", "0", "transfer", ts)
                await send("stranger private gaps", gap_src.frame([balance], skip=turn % 3 + 1))
                await send("seq 2^64-1", wire.encode(wire.Envelope(
                    seq_max.src, 1, U64_MAX, [trade])))  # fmt: skip
            if turn % 25 == 1:  # the real sources, silenced for good on today's code
                for src in (1, 2):
                    await send("epoch 2^64-1 for a real src", wire.encode(wire.Envelope(
                        src, U64_MAX, 1, [trade])))  # fmt: skip
            try:
                if tcp is None:
                    tcp = await trio.open_tcp_stream("127.0.0.1", target.tcp_port)
                    tally.sent["forging TCP connections"] += 1
                await tcp.send_all(wire.frame_tcp(wire.decode(tcp_src.frame([fill]))))
                tally.sent["forged fills over TCP"] += 1
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                tally.answers["forging TCP connection closed by the server"] += 1
                tcp = None
            await trio.sleep(0.2)
    if tcp is not None:
        await tcp.aclose()


async def ingest_idle(target: Target, tally: AttackTally, until: float) -> None:
    """Item 9: 70 TCP connections to the ingest port that never say anything, opened at 10/s
    and held up to 40 s; an unauthenticated peer must lose its slot in well under 30 s."""
    while trio.current_time() < until - 10:
        hold_until = min(trio.current_time() + 40, until - 2)
        async with trio.open_nursery() as nursery:
            for _ in range(70):
                nursery.start_soon(_idle_peer, target, tally, hold_until)
                await trio.sleep(0.1)
        await trio.sleep(2)


async def _idle_peer(target: Target, tally: AttackTally, hold_until: float) -> None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", target.tcp_port)
    except OSError as exc:
        tally.answers[f"connect: {type(exc).__name__}"] += 1
        return
    tally.sent["idle connections"] += 1
    opened = trio.current_time()
    async with stream:
        with trio.move_on_at(hold_until) as held:
            try:
                while await stream.receive_some(4096):
                    pass
                how = "closed"
            except (trio.BrokenResourceError, OSError):
                how = "reset"
        lasted = trio.current_time() - opened
        if held.cancelled_caught:
            tally.answers[f"still held at the end ({lasted:.0f} s)"] += 1
            if lasted >= 30:
                tally.fail("an idle, unauthenticated engine connection held its slot 30 s")
        else:
            tally.answers[
                f"{how} by the server after {'<1' if lasted < 1 else f'{lasted:.0f}'} s"
            ] += 1


async def sighup_latin1(target: Target, tally: AttackTally, until: float) -> None:
    """Item 3: the config file is rewritten with a Latin-1 byte in a comment and the supervisor
    gets SIGHUP (it passes it to every child); 4 s later the file is put back and SIGHUP again.
    The reload must be refused and logged, and every process keep running."""
    path = trio.Path(target.config_path)
    logs = target.logs
    good = await path.read_bytes()
    await trio.sleep(8)
    while trio.current_time() < until - 10 and tally.sent["SIGHUP with a Latin-1 config"] < 6:
        marker = len(logs.lines) if logs is not None else 0
        try:
            await path.write_bytes(good + b"\n# caf\xe9 (Latin-1)\n")
            os.kill(target.supervisor_pid, signal.SIGHUP)
            tally.sent["SIGHUP with a Latin-1 config"] += 1
            await trio.sleep(4)
        finally:
            with trio.CancelScope(shield=True):
                await path.write_bytes(good)
        os.kill(target.supervisor_pid, signal.SIGHUP)
        tally.sent["SIGHUP with the file put back"] += 1
        await trio.sleep(2)
        if logs is not None:
            for line in logs.lines[marker:]:
                event = str(line.get("event", ""))
                if any(w in event for w in ("reload", "config", "exited", "signal")):
                    tally.answers[f"log: {event[:60]}"] += 1
        await trio.sleep(14)


ATTACKS: dict[str, Attack] = {
    "continuation": continuation_flood,
    "ping": ping_flood,
    "oversize": oversize_frames,
    "bad-tokens": bad_tokens,
    "storm": reconnect_storm,
    "since": since_replay,
    "token-expiry": token_expiry,
    "uids": uid_flood,
    "publish-utf8": publish_bad_utf8,
    "ingest-forge": ingest_forge,
    "ingest-idle": ingest_idle,
    "sighup": sighup_latin1,
}
