"""Binance's all-market streams: ``!ticker@arr``, ``!miniTicker@arr`` (spot and USD-M) and
``!markPrice@arr[@1s]`` (USD-M). No I/O.

As Binance serves them: every second one frame, a JSON *array* of the payloads of the symbols
whose ticker (mark price) changed since the last frame; nothing when none did. The dialect
taps every symbol's ``ticker_<S>`` (``markprice_<S>``) channel while anyone follows a stream
made of it (``Hub.tap``), and each event is only kept as its symbol's latest data, not decoded
(``AllMarket.changed``). Once an interval (``AllMarket.due``) the changed symbols' data is
decoded once, made into each followed kind's payloads once and encoded once; every follower of
that kind gets the same bytes (a combined connection the same array wrapped
``{"stream":..,"data":..}``). So an event costs a dict store, and an interval one encoding per
kind, whatever the number of followers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Hashable
from typing import Any, Generic, Literal, TypeVar

import msgspec

from pushd.binance.payloads import mark_price, mini_ticker, ticker
from pushd.binance.streams import Kind, Market, Stream
from pushd.market.funding import MarkPriceData
from pushd.market.ticker import TickerData

Source = Literal["ticker", "markPrice"]  # the native stream an all-market stream is made of
SOURCES: dict[Kind, Source] = {"ticker": "ticker", "miniTicker": "ticker", "markPrice": "markPrice"}
INTERVAL_S = 1.0  # Binance sends the arrays every 1000 ms

Follower = TypeVar("Follower", bound=Hashable)

_encode = msgspec.json.Encoder().encode
_ticker = msgspec.json.Decoder(TickerData)
_mark = msgspec.json.Decoder(MarkPriceData)


class AllMarket(Generic[Follower]):
    """One surface's all-market streams: who follows which (by name and payload form) and the
    data changed since the last interval (see the module docstring)."""

    def __init__(self, market: Market) -> None:
        self._market = market
        self._changed: dict[Source, dict[str, msgspec.Raw]] = {"ticker": {}, "markPrice": {}}
        # (name, combined) -> the stream and its followers (an ordered set)
        self._followers: dict[tuple[str, bool], tuple[Stream, dict[Follower, None]]] = {}
        self.unreadable = 0  # changed data left out: not a ticker (mark price) that reads

    def follows(self, source: Source | None = None) -> bool:
        """Whether anyone follows an all-market stream (made of ``source``)."""
        return any(source is None or SOURCES[s.kind] == source for s, _ in self._followers.values())

    def follow(self, stream: Stream, combined: bool, who: Follower) -> Source | None:
        """``who`` follows ``stream``; returns its source when nobody followed it before (the
        shell taps that source's channels)."""
        source = SOURCES[stream.kind]
        new = not self.follows(source)
        self._followers.setdefault((stream.name, combined), (stream, {}))[1][who] = None
        return source if new else None

    def unfollow(self, stream: Stream, combined: bool, who: Follower) -> Source | None:
        """``who`` leaves ``stream``; returns its source when nobody follows it any more (the
        shell unties the taps)."""
        key = (stream.name, combined)
        entry = self._followers.get(key)
        if entry is None or who not in entry[1]:
            return None
        del entry[1][who]
        if entry[1]:
            return None
        del self._followers[key]
        source = SOURCES[stream.kind]
        if self.follows(source):
            return None
        self._changed[source] = {}
        return source

    def changed(self, source: Source, symbol: str, data: msgspec.Raw) -> None:
        """An event of ``symbol``'s ``source`` channel (a tap): its latest data."""
        self._changed[source][symbol] = data

    def due(self) -> list[tuple[bytes, Collection[Follower]]]:
        """The interval's frames' payloads and who gets each: per followed name and form, the
        array of the symbols changed since the last call (none when nothing changed)."""
        arrays: dict[Kind, bytes] = {}
        decoded: dict[Source, list[Any]] = {}
        out: list[tuple[bytes, Collection[Follower]]] = []
        for (name, combined), (stream, who) in self._followers.items():
            body = arrays.get(stream.kind)
            if body is None:
                body = arrays[stream.kind] = self._array(stream.kind, decoded)
            if body == b"[]":
                continue
            if combined:
                body = b'{"stream":"' + name.encode() + b'","data":' + body + b"}"
            out.append((body, who))
        self._changed = {"ticker": {}, "markPrice": {}}
        return out

    def _array(self, kind: Kind, decoded: dict[Source, list[Any]]) -> bytes:
        source = SOURCES[kind]
        data = decoded.get(source)
        if data is None:
            data = decoded[source] = self._decode(source)
        market = self._market
        make: Callable[[Any], dict[str, Any]]
        if kind == "miniTicker":
            make = mini_ticker
        elif kind == "markPrice":
            make = mark_price
        else:
            make = functools.partial(ticker, market=market)
        payloads = []
        for item in data:
            try:
                payloads.append(make(item))
            except ArithmeticError:  # a number that is none (decimal's InvalidOperation)
                self.unreadable += 1
        return _encode(payloads)

    def _decode(self, source: Source) -> list[Any]:
        out: list[Any] = []
        decoder = _ticker if source == "ticker" else _mark
        for data in self._changed[source].values():
            try:
                out.append(decoder.decode(data))
            except ValueError:  # anyone who may publish a market channel can send anything
                self.unreadable += 1
        return out
