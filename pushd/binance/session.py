"""One Binance connection's requests and subscriptions. No I/O.

``Session.handle(text)`` reads one client message and returns a ``Step``: the reply to send
and the streams to join and leave. Binance's rules, as its clients rely on them:

- ``{"method": "SUBSCRIBE"|"UNSUBSCRIBE", "params": [streams], "id": id}``: every name is
  checked before any is taken (all or nothing); a stream already subscribed is a success too;
- ``LIST_SUBSCRIPTIONS`` answers the names in the order they were subscribed;
- ``SET_PROPERTY ["combined", bool]`` / ``GET_PROPERTY ["combined"]``: payloads wrapped
  ``{"stream":..,"data":..}`` or not, from now on;
- ids: an int64, a string of at most 36 characters, or null, echoed;
- success ``{"result":null,"id":N}``; errors nested ``{"error":{"code":C,"msg":..},"id":N}``:
  code 0 an unknown property, 1 a value of the wrong type, 2 an invalid request (bad stream
  name, too many streams, unknown method), 3 invalid JSON (id null). ccxt takes a flat
  ``{"code":..}`` for a success and hangs on code 0 for anything else, so no other form is used;
- a SUBSCRIBE or UNSUBSCRIBE of N names costs ``ceil(N / 100)`` message tokens, at least one
  (``Step.cost``; ``pushd.binance.budget.message_cost``).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msgspec

from pushd.binance.budget import message_cost
from pushd.binance.streams import Market, Stream, parse
from pushd.errors import BinanceError

MAX_ID_CHARS = 36
SUBSCRIPTIONS = ("SUBSCRIBE", "UNSUBSCRIBE")  # requests that cost by their number of streams
INT64 = (-(2**63), 2**63 - 1)
RequestId = int | str | None

_encode = msgspec.json.Encoder().encode
_any = msgspec.json.Decoder()


class Step(msgspec.Struct, frozen=True):
    """What one message asks of the shell: a reply, streams to join and to leave, and whether
    the payload form (combined or raw) changed (every stream is joined again in it)."""

    reply: bytes
    join: list[Stream] = msgspec.field(default_factory=list)
    leave: list[Stream] = msgspec.field(default_factory=list)
    reform: bool = False
    cost: int = 1  # message tokens (``pushd.binance.budget.message_cost``), refused or not


def result(value: Any, request_id: RequestId) -> bytes:
    return _encode({"result": value, "id": request_id})


def error(code: int, msg: str, request_id: RequestId) -> bytes:
    return _encode({"error": {"code": code, "msg": msg}, "id": request_id})


def _request_id(value: Any) -> RequestId:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]:
        return value
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return value
    raise BinanceError(2, "Invalid request: request ID must be an int64, a string of at most "
                          f"{MAX_ID_CHARS} characters, or null")  # fmt: skip


class Session:
    """The subscriptions of one connection on a ``market`` surface (see the module docstring)."""

    __slots__ = ("_market", "_max_streams", "_symbols", "combined", "streams")

    def __init__(
        self, symbols: Container[str], market: Market, max_streams: int, combined: bool
    ) -> None:
        self._symbols = symbols
        self._market = market
        self._max_streams = max_streams
        self.combined = combined
        self.streams: dict[str, Stream] = {}  # by name, in the order subscribed

    def parse_streams(self, names: Any) -> list[Stream]:
        """Every name checked; raises BinanceError (code 2) for the first bad one."""
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BinanceError(2, "Invalid request: params must be a list of stream names")
        return [parse(name, self._symbols, self._market) for name in names]

    def subscribe(self, streams: list[Stream]) -> list[Stream]:
        """Add the streams not yet subscribed; all or none (BinanceError past the limit)."""
        new = {s.name: s for s in streams if s.name not in self.streams}
        if len(self.streams) + len(new) > self._max_streams:
            raise BinanceError(2, f"Invalid request: too many streams (at most "
                                  f"{self._max_streams} per connection)")  # fmt: skip
        self.streams.update(new)
        return list(new.values())

    def handle(self, text: str) -> Step:
        """One client message (see the module docstring); never raises."""
        request_id: RequestId = None
        cost = 1
        try:
            try:
                message = _any.decode(text)
            except (msgspec.DecodeError, RecursionError):
                raise BinanceError(3, "Invalid JSON: not one JSON value") from None
            if not isinstance(message, dict):
                raise BinanceError(3, "Invalid JSON: a request is a JSON object")
            params = message.get("params", [])
            if isinstance(params, list) and message.get("method") in SUBSCRIPTIONS:
                cost = message_cost(len(params))  # every name is read, taken or not
            request_id = _request_id(message.get("id"))
            step = self._method(message.get("method"), params, request_id)
        except BinanceError as exc:
            step = Step(error(exc.code, exc.msg, request_id))
        return msgspec.structs.replace(step, cost=cost) if cost != 1 else step

    def _method(self, method: Any, params: Any, request_id: RequestId) -> Step:
        if method == "SUBSCRIBE":
            return Step(result(None, request_id), join=self.subscribe(self.parse_streams(params)))
        if method == "UNSUBSCRIBE":
            names = [s.name for s in self.parse_streams(params)]
            left = [self.streams.pop(n) for n in names if n in self.streams]
            return Step(result(None, request_id), leave=left)
        if method == "LIST_SUBSCRIPTIONS":
            return Step(result(list(self.streams), request_id))
        if method in ("SET_PROPERTY", "GET_PROPERTY"):
            if not isinstance(params, list) or not params or params[0] != "combined":
                raise BinanceError(0, "Unknown property")
            if method == "GET_PROPERTY":
                return Step(result(self.combined, request_id))
            if len(params) != 2 or not isinstance(params[1], bool):
                raise BinanceError(1, "Invalid value type: expected Boolean")
            changed = params[1] != self.combined
            self.combined = params[1]
            return Step(result(None, request_id), reform=changed)
        raise BinanceError(2, "Invalid request: unknown method")
