"""The upgrade request's fast path (httptools) reads only what wsproto would accept, and answers
it byte for byte as wsproto does; everything else goes to wsproto unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

from pushd.gateway import admission
from pushd.gateway.upgrade import Upgrade

PLAIN = (
    b"GET /ws?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: https://example.com\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)

EDITS = [b" ", b"\t", b"\r", b"\n", b"\x00", b"\x7f", b"\x80", b":", b",", b"A", b"", b"\r\n",
         b"\xff", b"/", b"1.0", b"\r\n ", b"\r\nHost: a", b"\r\nContent-Length: 0", b"\r\nX",
         b"\r\nUpgrade: h2c", b"?", b"#", b"%", b"\x01"]  # fmt: skip


def wsproto_reads(data: bytes) -> tuple[H11Handshake, Request | None]:
    handshake = H11Handshake(ConnectionType.SERVER)
    handshake.receive_data(data)
    requests = [e for e in handshake.events() if isinstance(e, Request)]
    return handshake, requests[0] if requests else None


def test_a_plain_request_is_read_by_httptools_and_answered_as_wsproto_answers() -> None:
    upgrade = Upgrade()
    request = upgrade.receive(PLAIN)
    handshake, expected = wsproto_reads(PLAIN)
    assert upgrade.by_httptools
    assert request == expected
    answer, ws = upgrade.accept()
    assert answer == handshake.send(AcceptConnection())
    assert ws.state is handshake.connection.state  # type: ignore[union-attr]


def test_a_refused_fast_request_gets_wsproto_s_refusal() -> None:
    upgrade = Upgrade()
    upgrade.receive(PLAIN)
    handshake, _ = wsproto_reads(PLAIN)
    assert upgrade.refuse(admission.PER_IP) == admission.answer(handshake, admission.PER_IP)


def test_a_request_in_pieces_goes_to_wsproto() -> None:
    upgrade = Upgrade()
    assert upgrade.receive(PLAIN[:40]) is None
    request = upgrade.receive(PLAIN[40:])
    assert request == wsproto_reads(PLAIN)[1]
    assert not upgrade.by_httptools


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(PLAIN) - 1),
            st.sampled_from(EDITS),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_whatever_httptools_reads_wsproto_reads_the_same(
    edits: list[tuple[int, bytes, bool]],
) -> None:
    """A request edited anywhere: the fast path takes it only if wsproto takes it too, as the
    same request; else wsproto reads it (and refuses it, or not) exactly as before."""
    data = bytearray(PLAIN)
    for at, what, replace in edits:
        data[at : at + (1 if replace else 0)] = what
    upgrade = Upgrade()
    try:
        fast = upgrade.receive(bytes(data))
    except Exception:
        fast = None
    if upgrade.by_httptools:
        _, expected = wsproto_reads(bytes(data))  # raises if wsproto would refuse it
        assert fast == expected
