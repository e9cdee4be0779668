"""Request decoding and reply encoding, without sockets."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.errors import ErrorCode, RequestError
from pushd.gateway import protocol


def test_requests_decode() -> None:
    assert protocol.parse_request('{"op":"auth","token":"t"}') == protocol.Auth(token="t")
    sub = protocol.parse_request('{"op":"subscribe","channel":["a","b"],"id":"x"}')
    assert isinstance(sub, protocol.Subscribe)
    assert protocol.channels_of(sub) == ["a", "b"]
    assert sub.id == "x"
    unsub = protocol.parse_request('{"op":"unsubscribe","channel":"a","id":3}')
    assert isinstance(unsub, protocol.Unsubscribe)
    assert protocol.channels_of(unsub) == ["a"]
    assert protocol.parse_request('{"op":"ping","id":9}') == protocol.Ping(id=9)


def test_extra_fields_are_ignored() -> None:
    assert protocol.parse_request('{"op":"ping","future":1}') == protocol.Ping()


@pytest.mark.parametrize(
    ("text", "code", "request_id"),
    [
        ("{", ErrorCode.MALFORMED_JSON, None),
        ("not json", ErrorCode.MALFORMED_JSON, None),
        ("[1,2]", ErrorCode.UNKNOWN_OP, None),
        ('"auth"', ErrorCode.UNKNOWN_OP, None),
        ('{"op":"dance","id":4}', ErrorCode.UNKNOWN_OP, 4),
        ('{"id":4}', ErrorCode.UNKNOWN_OP, 4),
        ('{"op":"subscribe","id":5}', ErrorCode.INVALID_REQUEST, 5),
        ('{"op":"subscribe","channel":[],"id":"r"}', ErrorCode.INVALID_REQUEST, "r"),
        ('{"op":"subscribe","channel":7}', ErrorCode.INVALID_REQUEST, None),
        ('{"op":"auth","id":{"x":1}}', ErrorCode.INVALID_REQUEST, None),
        ('{"op":"ping","id":true}', ErrorCode.INVALID_REQUEST, None),
        ('{"op":"subscribe","channel":"' + "x" * 65 + '"}', ErrorCode.INVALID_REQUEST, None),
    ],
)
def test_bad_requests(text: str, code: ErrorCode, request_id: object) -> None:
    with pytest.raises(RequestError) as info:
        protocol.parse_request(text)
    assert info.value.code is code
    assert info.value.request_id == request_id


@given(st.binary(max_size=200))
def test_any_bytes_give_a_request_or_a_request_error(data: bytes) -> None:
    try:
        protocol.parse_request(data)
    except RequestError as exc:
        reply = msgspec.json.decode(protocol.encode_error(exc))
        assert reply["code"] == int(exc.code)
        assert isinstance(reply["msg"], str)


def test_replies() -> None:
    assert protocol.encode_result() == b'{"result":true}'
    assert protocol.encode_result(7, uid="1001") == b'{"result":true,"id":7,"uid":"1001"}'
    err = RequestError(ErrorCode.UNKNOWN_CHANNEL)
    assert protocol.encode_error(err) == b'{"code":5,"msg":"unknown channel"}'
    assert protocol.encode_pong(123, "a") == b'{"op":"pong","ts":123,"id":"a"}'
    event = protocol.encode_event("BTCUSDT@depth", msgspec.Raw(b'{"bids":[]}'), 4, "ab12")
    assert event == b'{"event":"BTCUSDT@depth","data":{"bids":[]},"seq":4,"epoch":"ab12"}'
    resync = protocol.encode_resync("X@trades", 9, "ab12")
    assert resync == b'{"event":"X@trades","resync":true,"seq":9,"epoch":"ab12"}'
    streams = {"X@trades": protocol.StreamPosition("ab12", 9)}
    reply = protocol.encode_subscribed(streams, "s1", recovered=True)
    assert reply == (
        b'{"result":true,"streams":{"X@trades":{"epoch":"ab12","seq":9}},"id":"s1","recovered":true}'
    )
    assert b"recovered" not in protocol.encode_subscribed(streams)  # only when since was asked


@pytest.mark.parametrize("text", ['{"op":1}xx', '{"op":"subscribe","channel":5} ]', "[1]x"])
def test_invalid_then_trailing_garbage_is_malformed(text: str) -> None:
    """msgspec validates before it sees the tail: found by tests/test_fuzz.py."""
    with pytest.raises(RequestError) as info:
        protocol.parse_request(text)
    assert info.value.code is ErrorCode.MALFORMED_JSON


def test_every_code_is_documented() -> None:
    """docs/protocol.md has a row for every error code and close code the server sends."""
    from pathlib import Path

    from pushd.errors import CloseCode

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for code in ErrorCode:
        assert f"\n| {int(code)} |" in doc, code
    for close in CloseCode:
        assert f"\n| {int(close)} |" in doc, close
    for status in (400, 403, 404, 429, 503):
        assert f"\n| {status} |" in doc, status


@pytest.mark.parametrize(
    "text",
    ['{"op":"subscribe","channel":' + "[" * 1200 + "]" * 1200 + "}", "[" * 3000 + "]" * 3000],
)
def test_deeply_nested_request_is_malformed_not_a_crash(text: str) -> None:
    # msgspec raises RecursionError past its depth limit; fits in the 4 KiB message limit
    with pytest.raises(RequestError) as caught:
        protocol.parse_request(text)
    assert caught.value.code is ErrorCode.MALFORMED_JSON
