"""The client protocol's messages: requests decoded, replies and events encoded. No I/O.

Requests are a msgspec tagged union on ``op``; one decoder is built once. Replies and events are
encoded with one shared encoder. See ``docs/protocol.md`` for the wire-level description.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from pushd.errors import ErrorCode, RequestError

RequestId = int | Annotated[str, msgspec.Meta(max_length=64)]
ChannelName = Annotated[str, msgspec.Meta(max_length=64)]
ChannelList = Annotated[list[ChannelName], msgspec.Meta(min_length=1)]


class Auth(msgspec.Struct, tag="auth", tag_field="op", frozen=True):
    token: Annotated[str, msgspec.Meta(max_length=4096)]
    id: RequestId | None = None


class Since(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The last event a client has of a channel: its ``seq`` in ``epoch``."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    epoch: Annotated[str, msgspec.Meta(max_length=32)]


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="op", frozen=True):
    channel: ChannelName | ChannelList
    id: RequestId | None = None
    since: Since | None = None  # recover what was missed: one channel only


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", frozen=True):
    channel: ChannelName | ChannelList
    id: RequestId | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="op", frozen=True):
    id: RequestId | None = None


Request = Auth | Subscribe | Unsubscribe | Ping
OPS = ("auth", "subscribe", "unsubscribe", "ping")


class _Envelope(msgspec.Struct):
    """What is left to read of a request that did not decode: its op and id, if any."""

    op: Any = None
    id: Any = None


class Result(msgspec.Struct, omit_defaults=True):
    result: bool
    id: RequestId | None = None
    uid: str | None = None


class StreamPosition(msgspec.Struct, frozen=True):
    epoch: str
    seq: int


class Subscribed(msgspec.Struct, omit_defaults=True):
    """The reply to a subscribe: where each new stream stands (its events that follow have
    seqs up to ``seq`` for its current state or a replay, then above it); ``recovered`` only
    when the request had ``since``, and ``reason`` why not when it is false."""

    result: bool
    streams: dict[str, StreamPosition]
    id: RequestId | None = None
    recovered: bool | None = None
    reason: str | None = None


class Error(msgspec.Struct, omit_defaults=True):
    code: int
    msg: str
    id: RequestId | None = None


class Pong(msgspec.Struct, omit_defaults=True):
    op: str
    ts: int
    id: RequestId | None = None


class Event(msgspec.Struct):
    """A pushed event; ``data`` is the publisher's JSON, embedded as it came."""

    event: str
    data: msgspec.Raw
    seq: int
    epoch: str


class CurrentAfterLag(msgspec.Struct):
    """A stream's current state sent to a subscriber whose events were dropped (marked so)."""

    event: str
    data: msgspec.Raw
    seq: int
    epoch: str
    resync: bool = True


class Resync(msgspec.Struct):
    """Told to a subscriber whose events were dropped: seq ``seq`` and earlier are lost to it."""

    event: str
    resync: bool
    seq: int
    epoch: str


class ExpiryData(msgspec.Struct, rename="camel"):
    expires_in: float
    exp: float


class AuthNotice(msgspec.Struct):
    """``{"event":"@auth","data":{"expiresIn":..,"exp":..}}``: log in again with a fresh
    token before ``exp`` (Unix seconds). Not a stream: no seq, no epoch."""

    event: str
    data: ExpiryData


_decoder = msgspec.json.Decoder(Request)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


def parse_request(text: str | bytes) -> Request:
    """Decode one client request.

    Raises:
        RequestError: MALFORMED_JSON, UNKNOWN_OP or INVALID_REQUEST; ``request_id`` of the error
        is the request's ``id`` where one could be read, so the reply can echo it.
    """
    try:
        request: Request = _decoder.decode(text)
        return request
    except msgspec.ValidationError as exc:
        try:  # msgspec validates as it parses: a wrong field may hide a malformed tail
            msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError):  # nested past msgspec's depth limit
            raise RequestError(ErrorCode.MALFORMED_JSON) from None
        try:
            envelope = _envelope_decoder.decode(text)
        except msgspec.ValidationError:  # valid JSON, but not an object
            envelope = _Envelope()
        request_id = envelope.id if _valid_id(envelope.id) else None
        if envelope.op not in OPS:
            err = RequestError(ErrorCode.UNKNOWN_OP, f"unknown op {envelope.op!r}"[:200])
        else:
            err = RequestError(ErrorCode.INVALID_REQUEST, f"invalid request: {exc}")
        err.request_id = request_id
        raise err from None
    except (msgspec.DecodeError, RecursionError):
        raise RequestError(ErrorCode.MALFORMED_JSON) from None


def _valid_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and len(value) <= 64
    )


def channels_of(request: Subscribe | Unsubscribe) -> list[str]:
    return [request.channel] if isinstance(request.channel, str) else request.channel


def encode_result(request_id: RequestId | None = None, uid: str | None = None) -> bytes:
    return _encoder.encode(Result(True, id=request_id, uid=uid))


def encode_error(err: RequestError) -> bytes:
    return _encoder.encode(Error(code=int(err.code), msg=err.msg, id=err.request_id))


def encode_pong(ts_ms: int, request_id: RequestId | None = None) -> bytes:
    return _encoder.encode(Pong("pong", ts_ms, id=request_id))


def encode_subscribed(
    streams: dict[str, StreamPosition],
    request_id: RequestId | None = None,
    recovered: bool | None = None,
    reason: str | None = None,
) -> bytes:
    return _encoder.encode(
        Subscribed(True, streams, id=request_id, recovered=recovered, reason=reason)
    )


def encode_event(event: str, data: msgspec.Raw, seq: int, epoch: str) -> bytes:
    return _encoder.encode(Event(event=event, data=data, seq=seq, epoch=epoch))


def encode_current_after_lag(event: str, data: msgspec.Raw, seq: int, epoch: str) -> bytes:
    return _encoder.encode(CurrentAfterLag(event=event, data=data, seq=seq, epoch=epoch))


def encode_resync(event: str, seq: int, epoch: str) -> bytes:
    return _encoder.encode(Resync(event=event, resync=True, seq=seq, epoch=epoch))


def encode_auth_notice(expires_in: float, exp: float) -> bytes:
    return _encoder.encode(AuthNotice("@auth", ExpiryData(expires_in, exp)))
