"""Defects found reviewing issue 20's gateway redesign (steps 0-4), each pinned by a test that
failed on the redesign as it was handed over."""

from __future__ import annotations

import trio
from conftest import RawClient, Running
from wsproto.events import AcceptConnection, CloseConnection


async def test_a_client_close_is_answered_with_its_code_and_reason(running: Running) -> None:
    """RFC 6455 5.5.1 (wsproto's ``CloseConnection.response``): the answer echoes the client's
    close frame, its reason included, as before the redesign."""
    raw = await RawClient.connect(running.ports.websocket)
    assert isinstance(await raw.handshake(), AcceptConnection)
    await raw.send_raw(raw.ws.send(CloseConnection(code=1000, reason="bye for now")))
    answer = None
    with trio.fail_after(10):
        while answer is None:
            data = await raw.stream.receive_some(65536)
            raw.ws.receive_data(data or None)
            answer = next((e for e in raw.ws.events() if isinstance(e, CloseConnection)), None)
    assert (answer.code, answer.reason) == (1000, "bye for now")
    await raw.aclose()
