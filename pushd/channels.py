"""Channel names: what clients say (protocol) and what the bus carries (internal).

The request's table, plus kline intervals and the exchange-wide notice channel:

==========================  ==============================  =========
protocol channel            internal channel                private
==========================  ==============================  =========
``<symbol>@depth``          ``depth_<symbol>``              no
``<symbol>@trades``         ``trades_<symbol>``             no
``<symbol>@markPrice``      ``markprice_<symbol>``          no
``<symbol>@ticker``         ``ticker_<symbol>``             no
``<symbol>@kline``          ``kline_<symbol>`` (1m)         no
``<symbol>@kline_<iv>``     ``kline_<symbol>_<iv>``         no
``notice``                  ``notice``                      no
``@balance``                ``user_<uid>_balance``          yes
``@order``                  ``user_<uid>_order``            yes
``@position``               ``user_<uid>_position``         yes
``@account``                ``user_<uid>_account``          yes
==========================  ==============================  =========

A private channel's uid never comes from the client: it is the verified uid of the session, so no
spelling of a protocol channel can name another user's internal channel.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container

import msgspec

from pushd.errors import ErrorCode, RequestError

PUBLIC_STREAMS: dict[str, str] = {
    "depth": "depth",
    "trades": "trades",
    "markPrice": "markprice",
    "ticker": "ticker",
    "kline": "kline",
}
PRIVATE_STREAMS: tuple[str, ...] = ("balance", "order", "position", "account")
KLINE_INTERVALS: tuple[str, ...] = (
    "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "1w", "1M",
)  # fmt: skip
NOTICE = "notice"

UID_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z.\-]{0,63}")
SYMBOL_PATTERN = re.compile(r"[0-9A-Z]{2,32}")

_INTERNAL_PUBLIC = {internal: protocol for protocol, internal in PUBLIC_STREAMS.items()}


class Channel(msgspec.Struct, frozen=True, gc=False):
    """One resolved channel: its bus name, the event name clients see, and who may read it."""

    internal: str
    protocol: str
    private: bool
    symbol: str | None = None


def resolve(name: str, symbols: Container[str], uid: str | None) -> Channel:
    """Resolve a client's protocol channel name for the session logged in as ``uid``.

    Raises:
        RequestError: UNKNOWN_CHANNEL, UNKNOWN_SYMBOL, or LOGIN_REQUIRED for a private channel
        before ``auth``.
    """
    if name == NOTICE:
        return Channel(NOTICE, NOTICE, private=False)
    symbol, at, stream = name.partition("@")
    if not at:
        raise RequestError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {name!r}")
    if not symbol:
        if stream not in PRIVATE_STREAMS:
            raise RequestError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {name!r}")
        if uid is None:
            raise RequestError(ErrorCode.LOGIN_REQUIRED, f"login required for {name!r}")
        return Channel(f"user_{uid}_{stream}", name, private=True)
    kind, underscore, interval = stream.partition("_")
    internal_kind = PUBLIC_STREAMS.get(kind)
    if internal_kind is None or (
        underscore and (kind != "kline" or interval not in KLINE_INTERVALS)
    ):
        raise RequestError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {name!r}")
    if symbol not in symbols:
        raise RequestError(ErrorCode.UNKNOWN_SYMBOL, f"unknown symbol {symbol!r}")
    if interval == "1m":  # one stream, one name: @kline_1m is @kline
        interval = ""
    # the event name is the stream's one canonical spelling, never the client's
    if interval:
        return Channel(f"{internal_kind}_{symbol}_{interval}", f"{symbol}@{kind}_{interval}",
                       private=False, symbol=symbol)  # fmt: skip
    return Channel(f"{internal_kind}_{symbol}", f"{symbol}@{kind}", private=False, symbol=symbol)


def parse_internal(name: str, symbols: Container[str]) -> Channel:
    """Resolve an internal (bus) channel name, as the publish API and ingest use them.

    Raises:
        ValueError: the name is not one of the internal channel forms, or names an unknown symbol.
    """
    if name == NOTICE:
        return Channel(NOTICE, NOTICE, private=False)
    if name.startswith("user_"):
        uid, _, stream = name[5:].rpartition("_")
        if stream not in PRIVATE_STREAMS or not UID_PATTERN.fullmatch(uid):
            raise ValueError(f"not a private channel: {name!r} (want user_<uid>_<stream>)")
        return Channel(name, f"@{stream}", private=True)
    kind, _, rest = name.partition("_")
    protocol_kind = _INTERNAL_PUBLIC.get(kind)
    if protocol_kind is None or not rest:
        raise ValueError(f"unknown internal channel {name!r}")
    symbol, _, interval = rest.partition("_")
    if symbol not in symbols:
        raise ValueError(f"unknown symbol {symbol!r} in channel {name!r}")
    if interval and (kind != "kline" or interval not in KLINE_INTERVALS or interval == "1m"):
        raise ValueError(f"unknown internal channel {name!r}")
    protocol = f"{symbol}@{protocol_kind}_{interval}" if interval else f"{symbol}@{protocol_kind}"
    return Channel(name, protocol, private=False, symbol=symbol)


def market_channel(stream: str, symbol: str, interval: str = "1m") -> str:
    """The internal channel of a public market stream (``stream`` as in ``PUBLIC_STREAMS``)."""
    internal = f"{PUBLIC_STREAMS[stream]}_{symbol}"
    if stream == "kline" and interval != "1m":
        internal += f"_{interval}"
    return internal


def private_channel(uid: str, stream: str) -> str:
    """The internal channel of one user's private stream (``user_<uid>_<stream>``)."""
    if stream not in PRIVATE_STREAMS:
        raise ValueError(f"unknown private stream {stream!r}")
    if not UID_PATTERN.fullmatch(uid):
        raise ValueError(f"invalid uid {uid!r}")
    return f"user_{uid}_{stream}"


class StateKind(enum.Enum):
    """What a stream's events are, which says what a late subscriber needs of it."""

    EVENTS = "events"  # trades, notice, private: each event is news; recovery replays them
    WHOLE = "whole"  # ticker, kline, markPrice: each event is the whole state
    DIFF = "diff"  # depth: each event changes a state (the book) a subscriber must start from


_STATE_PREFIXES = {"ticker_": StateKind.WHOLE, "kline_": StateKind.WHOLE,
                   "markprice_": StateKind.WHOLE, "depth_": StateKind.DIFF}  # fmt: skip


def state_kind(internal: str) -> StateKind:
    """The kind of an internal channel's stream (see ``StateKind``)."""
    prefix = internal[: internal.find("_") + 1]
    return _STATE_PREFIXES.get(prefix, StateKind.EVENTS)
