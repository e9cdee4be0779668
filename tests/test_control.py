"""The control channel is open to anyone with access to Redis: what is published there that
is not a command is logged and dropped, and the node obeys on. Real daemons on a private
redis-server (and a Cluster), real sockets."""

from __future__ import annotations

import coredis
import msgspec
import pytest
import trio
import trio_websocket
from conftest import open_client, start_daemon, subscribed
from redis_servers import Redis
from structlog.testing import capture_logs
from test_cluster import redis_config

from pushd.bus.control import Kick, PrivateGap, Stats, _command

MALFORMED = [
    b"not json",
    b"\xff\xfe",  # not UTF-8
    b"[1, 2]",
    b'"kick"',
    b"{}",  # no op
    b'{"op": "reboot"}',  # an op nobody knows
    b'{"op": "kick"}',  # a kick of nobody
    b'{"op": "kick", "uid": 1001}',
    b'{"op": "kick", "uid": "1001", "reply": 7}',
    b'{"op": "stats", "origin": ["x"]}',
    b'{"op": "private_gap", "ts": "yesterday"}',
    b"[" * 100_000,  # nested past the decoder's depth
]


def test_commands_keep_their_wire_form() -> None:
    """The tagged union speaks what the nodes of the release before it speak (a rolling
    upgrade runs both): ``{"op": ..., fields}``, defaults left out."""
    assert _command.decode(b'{"op":"kick","uid":"7","reply":"r","origin":"n"}') == Kick(
        uid="7", reply="r", origin="n"
    )
    assert _command.decode(b'{"op":"stats","reply":"r","extra":1}') == Stats(reply="r")
    gap = PrivateGap(reason="frames lost", id="t", ts=1.5)
    assert (
        msgspec.json.encode(gap) == b'{"op":"private_gap","reason":"frames lost","id":"t","ts":1.5}'
    )
    assert _command.decode(msgspec.json.encode(gap)) == gap


async def test_malformed_commands_are_dropped_and_the_node_obeys_on(
    nursery: trio.Nursery, redis: Redis
) -> None:
    """Each thing published on the control channel that is not a command is logged as
    dropped; the node stays ready, and a kick published after them still closes the user's
    connection and is answered."""
    node = await start_daemon(nursery, redis_config(redis, "all"))
    bus, control = node.daemon.redis, node.daemon.control
    assert bus is not None and control is not None
    await bus.wait_ready()
    with capture_logs() as logs:
        async with open_client(node.ws_url) as client:
            await client.call({"op": "auth", "token": node.token("1001")})
            reply = await client.call({"op": "subscribe", "channel": "@order"})
            assert subscribed(reply, "@order"), reply
            # the first node's own connection: PUBLISH is not a keyed command, and a Cluster
            # broadcasts it to every node's subscribers
            async with coredis.Redis.from_url(redis.url, decode_responses=False) as r:
                for payload in MALFORMED:
                    await r.publish(f"{bus.prefix}:control", payload)
            # published after them (Redis keeps the order): answered once they were read
            assert await control.kick("1001") == (1, 1)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await client.recv()
            assert closed.value.reason.code == 4003
    dropped = [line for line in logs if line["event"] == "control command dropped"]
    assert len(dropped) == len(MALFORMED), [line["event"] for line in logs]
    assert bus.not_ready() is None
    assert [n.node for n in await control.nodes()] == [control.node_id]
