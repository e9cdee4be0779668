"""Binance stream names, parsed into pushd's internal channels. No I/O.

==============================================  =========================  ==================
Binance stream (lower-case symbol)              internal channel           market
==============================================  =========================  ==================
``<s>@depth``, ``<s>@depth@100ms|250ms|500ms``  ``depth_<S>``              spot, futures
``|1000ms``  (diffs: ``depthUpdate``)
``<s>@depth5|10|20[@100ms|250ms|500ms]``        ``depth_<S>`` (partial)    spot, futures
``<s>@bookTicker``                              ``depth_<S>`` (top)        spot, futures
``<s>@trade``, ``<s>@aggTrade``                 ``trades_<S>``             spot, futures
``<s>@ticker``, ``<s>@miniTicker``              ``ticker_<S>``             spot, futures
``<s>@kline_<interval>``                        ``kline_<S>[_<iv>]``       spot, futures
``<s>@markPrice``, ``<s>@markPrice@1s``         ``markprice_<S>``          futures
``!ticker@arr``, ``!miniTicker@arr``            ``ticker_<S>``, every S    spot, futures
``[@1000ms|3000ms]``
``!markPrice@arr[@1s]``                         ``markprice_<S>``, each S  futures
==============================================  =========================  ==================

The all-market streams (``!...@arr``, ``Stream.every``) have no one channel: each second one
array of the symbols that changed (``pushd.binance.arrays``), whatever the rate suffix.

The rate suffix (``@100ms``, ``@1s``) is accepted and names a stream of its own (it is echoed
in ``LIST_SUBSCRIPTIONS`` and in combined payloads as the client spelled it), but events come
at the symbol's configured interval (``depth_interval_ms``, ``mark_interval_ms``).
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Literal

import msgspec

from pushd.channels import KLINE_INTERVALS, market_channel
from pushd.errors import InvalidStream

Market = Literal["spot", "futures"]
Kind = Literal[
    "depth", "partial", "bookTicker", "trade", "aggTrade", "ticker", "miniTicker", "kline",
    "markPrice",
]  # fmt: skip

DEPTH_RATES = ("", "@100ms", "@250ms", "@500ms", "@1000ms")
PARTIAL_RATES = ("", "@100ms", "@250ms", "@500ms")
PARTIAL_LEVELS = (5, 10, 20)
MARK_RATES = ("", "@1s")
_PARTIAL_DIGITS = {str(n): n for n in PARTIAL_LEVELS}  # as written: no leading zeros
_NAME = re.compile(r"([0-9a-zA-Z]{2,32})@([A-Za-z]+)(\d*)(_\w+)?(@\w+)?", re.ASCII)


# streams named by a kind alone: (kind, the native stream they come from)
_SIMPLE: dict[str, tuple[Kind, str]] = {
    "trade": ("trade", "trades"), "aggTrade": ("aggTrade", "trades"),
    "ticker": ("ticker", "ticker"), "miniTicker": ("miniTicker", "ticker"),
    "bookTicker": ("bookTicker", "depth"), "markPrice": ("markPrice", "markPrice"),
}  # fmt: skip


class Stream(msgspec.Struct, frozen=True, gc=False):
    """One Binance stream: its canonical name, what it is and the channel it comes from."""

    name: str  # as echoed: the symbol lower-cased, the rest as Binance spells it
    symbol: str  # upper case, as in the payloads' "s" and pushd's channels
    kind: Kind
    internal: str
    levels: int = 0  # partial depth: 5, 10 or 20
    interval: str = ""  # kline
    every: bool = False  # an all-market stream: no symbol, no one channel ("" both)


# all-market streams: the name before the rate suffix -> its kind, and the suffixes accepted
# (python-binance's miniticker_socket appends @1000ms; ccxt's watch_mark_prices @1s)
_EVERY: dict[str, tuple[Kind, tuple[str, ...]]] = {
    "!ticker@arr": ("ticker", ("",)),
    "!miniTicker@arr": ("miniTicker", ("", "@1000ms", "@3000ms")),
    "!markPrice@arr": ("markPrice", MARK_RATES),
}


def _every(name: str, market: Market) -> Stream:
    head, at, rate = name.partition("@arr")
    known = _EVERY.get(head + at)
    if known is None or rate not in known[1] or (known[0] == "markPrice" and market != "futures"):
        raise InvalidStream(f"invalid stream name {name[:64]!r}")
    return Stream(name, "", known[0], "", every=True)


def parse(name: str, symbols: Container[str], market: Market) -> Stream:
    """The stream a client named, on a ``market`` surface serving ``symbols``.

    Raises:
        InvalidStream: not a stream name, a stream not served on this market, or an unknown
        symbol.
    """
    if name.startswith("!"):
        return _every(name, market)
    match = _NAME.fullmatch(name) if len(name) <= 64 else None
    if match is None:
        raise InvalidStream(f"invalid stream name {name[:64]!r}")
    raw_symbol, kind, digits, suffix, rate = match.groups(default="")
    symbol = raw_symbol.upper()
    canonical = f"{raw_symbol.lower()}@{kind}{digits}{suffix}{rate}"
    stream: Stream | None = None
    if kind == "depth" and not suffix:
        if not digits and rate in DEPTH_RATES:
            stream = Stream(canonical, symbol, "depth", market_channel("depth", symbol))
        elif digits in _PARTIAL_DIGITS and rate in PARTIAL_RATES:
            stream = Stream(canonical, symbol, "partial", market_channel("depth", symbol),
                            levels=_PARTIAL_DIGITS[digits])  # fmt: skip
    elif kind == "kline" and not digits and not rate and suffix[1:] in KLINE_INTERVALS:
        interval = suffix[1:]
        stream = Stream(canonical, symbol, "kline", market_channel("kline", symbol, interval),
                        interval=interval)  # fmt: skip
    elif digits or suffix:
        stream = None
    elif (
        (source := _SIMPLE.get(kind)) is not None
        and (not rate or (kind == "markPrice" and rate in MARK_RATES))
        and (kind != "markPrice" or market == "futures")
    ):
        stream = Stream(canonical, symbol, source[0], market_channel(source[1], symbol))
    if stream is None:
        raise InvalidStream(f"invalid stream name {name!r}")
    if symbol not in symbols:
        raise InvalidStream(f"unknown symbol in stream name {name!r}")
    return stream
