"""pushd's native events translated to Binance payloads. No I/O.

A ``Translator`` turns one native event of an internal channel (its epoch, seq and JSON data)
into the Binance payloads of one stream: zero or more JSON objects, one per frame. Prices and
quantities stay the exact decimal strings pushd computed; ids and times are integers.

- depth diffs: ``U = u =`` the event's update id (``pushd.binance.ids``), USD-M ``pu`` the id
  before it; pushd's ``snapshot`` events (a new subscriber's first event, an engine resync) are
  not sent -- Binance has no mid-stream snapshot, so a resync is a visible break in the chain;
- a batch of N trades is N ``trade`` (or ``aggTrade``, ``a = f = l =`` the trade id) payloads;
- the 24 h ticker's last quantity ``Q`` and spot's best bid and ask ``b B a A`` are the native
  ticker's ``lastQty`` and the top of the book at its ``closeTime`` (``bidPrice`` ...); a
  candle's ``f``, ``L``, ``V``, ``Q`` its first and last trade ids and taker-buy volumes
  (``-1``: a candle stored by a pushd that did not count them);
- partial depth and ``bookTicker`` are read off a mirror of the book (``BookMirror``) that the
  depth events keep up to date, seeded by the stream's current state;
- the depth streams send nothing of an epoch that begins more than a day after this host's
  clock (``pushd.binance.ids.EpochGuard``; logged once per epoch): its ids would stand above
  those of the correct epochs after it. The clock is the one thing read here; it is a
  parameter (``clock``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec
import structlog

from pushd.binance.ids import EPOCHS, EpochGuard, ahead_ms, update_id
from pushd.binance.streams import Market, Stream
from pushd.bus.model import Position, Recovery, Snapshot
from pushd.market.decimals import EXACT, quantize
from pushd.market.depth import DepthEvent, LocalBook
from pushd.market.funding import MarkPriceData
from pushd.market.kline import Candle
from pushd.market.markets import wall_ms
from pushd.market.ticker import TickerData
from pushd.market.trades import TradeBatch

_encode = msgspec.json.Encoder().encode
_depth = msgspec.json.Decoder(DepthEvent)
_trades = msgspec.json.Decoder(TradeBatch)
_ticker = msgspec.json.Decoder(TickerData)
_candle = msgspec.json.Decoder(Candle)
_mark = msgspec.json.Decoder(MarkPriceData)
# the stream's current state and where it stands (the hub's ``current``)
SPOT_ZERO = "0.00000000"
Current = Callable[[], Snapshot | None]

log = structlog.get_logger("pushd.binance.payloads")


def admitted(epoch: str, now_ms: int, epochs: EpochGuard = EPOCHS) -> bool:
    """Whether update ids of ``epoch`` may be given out at ``now_ms`` (``EpochGuard``); a
    refusal is logged once per epoch."""
    if epochs.admits(epoch, now_ms):
        return True
    if epochs.first_refusal(epoch):
        log.warning("binance: a depth epoch begins more than a day after this host's clock: "
                    "its update ids are not given out", epoch=epoch[:32],
                    ahead_ms=ahead_ms(epoch, now_ms))  # fmt: skip
    return False


def depth_update(event: DepthEvent, market: Market, epoch: str, seq: int) -> dict[str, Any]:
    uid = update_id(epoch, seq)
    if market == "spot":  # a level removed is "0.00000000", as Binance spot writes it:
        # python-binance's DepthCacheManager deletes a level on that string only
        bids, asks = ([[p, SPOT_ZERO if q == "0" else q] for p, q in side]
                      for side in (event.bids, event.asks))  # fmt: skip
        return {"e": "depthUpdate", "E": event.T, "s": event.s, "U": uid, "u": uid,
                "b": bids, "a": asks}  # fmt: skip
    return {"e": "depthUpdate", "E": event.T, "T": event.T, "s": event.s, "U": uid, "u": uid,
            "pu": uid - 1, "b": event.bids, "a": event.asks}  # fmt: skip


def trades(batch: TradeBatch, market: Market, agg: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in batch.trades:
        maker = t.side == "sell"  # the taker sold: the buyer was the maker
        if agg:
            item: dict[str, Any] = {"e": "aggTrade", "E": t.ts, "s": batch.s, "a": t.id,
                                    "p": t.price, "q": t.qty, "f": t.id, "l": t.id, "T": t.ts,
                                    "m": maker}  # fmt: skip
        elif market == "spot":
            item = {"e": "trade", "E": t.ts, "s": batch.s, "t": t.id, "p": t.price, "q": t.qty,
                    "T": t.ts, "m": maker}  # fmt: skip
        else:
            item = {"e": "trade", "E": t.ts, "T": t.ts, "s": batch.s, "t": t.id, "p": t.price,
                    "q": t.qty, "X": "MARKET", "m": maker}  # fmt: skip
        if market == "spot":
            item["M"] = True
        out.append(item)
    return out


def weighted_average(ticker: TickerData) -> str:
    volume = Decimal(ticker.volume)
    if not volume:
        return "0"
    return quantize(EXACT.divide(Decimal(ticker.quoteVolume), volume), 8)


def mini_ticker(t: TickerData) -> dict[str, Any]:
    return {"e": "24hrMiniTicker", "E": t.closeTime, "s": t.s, "c": t.last, "o": t.open,
            "h": t.high, "l": t.low, "v": t.volume, "q": t.quoteVolume}  # fmt: skip


def ticker(t: TickerData, market: Market) -> dict[str, Any]:
    out: dict[str, Any] = {"e": "24hrTicker", "E": t.closeTime, "s": t.s, "p": t.change,
                           "P": t.changePercent, "w": weighted_average(t)}  # fmt: skip
    if market == "spot":
        out["x"] = t.open
    out.update({"c": t.last, "Q": t.lastQty})
    if market == "spot":
        out.update({"b": t.bidPrice, "B": t.bidQty, "a": t.askPrice, "A": t.askQty})
    out.update({"o": t.open, "h": t.high, "l": t.low, "v": t.volume, "q": t.quoteVolume,
                "O": t.openTime, "C": t.closeTime, "F": t.firstId if t.firstId is not None else -1,
                "L": t.lastId if t.count else -1, "n": t.count})  # fmt: skip
    return out


def kline_fields(c: Candle) -> dict[str, Any]:
    """A candle as Binance's ``k`` object (also the REST kline's source)."""
    return {"t": c.openTime, "T": c.closeTime, "s": c.s, "i": c.i, "f": c.firstId,
            "L": c.lastId, "o": c.open, "c": c.close, "h": c.high, "l": c.low, "v": c.volume,
            "n": c.count, "x": c.closed, "q": c.quoteVolume, "V": c.takerBuyVolume,
            "Q": c.takerBuyQuoteVolume, "B": "0"}  # fmt: skip


def mark_price(m: MarkPriceData) -> dict[str, Any]:
    return {"e": "markPriceUpdate", "E": m.T, "s": m.s, "p": m.markPrice, "i": m.indexPrice,
            "P": m.estimatedSettlePrice, "r": m.fundingRate, "T": m.nextFundingTime}  # fmt: skip


class BookMirror:
    """The book after each depth event, for the streams that read the top of it (partial
    depth, ``bookTicker``): seeded by the stream's current state (``current``: where this
    process keeps the books) or by a state and the diffs after it that the bus offers (a
    gateway node: ``offer``), then moved by its events; an event that does not follow the one
    held drops the book until a state comes again (``wants_state``). Every view of one book
    shares its mirror (``Mirrors``): the first to see an event moves it, the others find it
    there, and the sorted book is made once per event."""

    def __init__(self, current: Current) -> None:
        self._current = current
        self._book: LocalBook | None = None
        self._seq = -1
        self._epoch = ""
        self._sorted: tuple[list[tuple[str, str]], list[tuple[str, str]]] | None = None

    @property
    def wants_state(self) -> bool:
        return self._book is None

    def offer(self, recovery: Recovery) -> None:
        """A stored state and the diffs after it (``Recovery.current``), taken when there is no
        book: the mirror stands at the last of them."""
        if self._book is not None or not recovery.current:
            return
        book = LocalBook()
        try:
            for entry in recovery.current:
                book.apply(_depth.decode(entry.data))
        except (ValueError, ArithmeticError):  # not a chain that checks out (msgspec's errors
            return  # are ValueErrors; a price that is no number, decimal's InvalidOperation)
        self._book, self._epoch = book, recovery.position.epoch
        self._seq, self._sorted = recovery.current[-1].seq, None

    def apply(self, epoch: str, seq: int, event: DepthEvent) -> bool:
        """Move the book to event ``seq``; False while there is no book at that event (or the
        book offered is past it already)."""
        if self._book is not None and epoch == self._epoch and seq <= self._seq:
            return seq == self._seq  # another view moved it here; past it: the state offered
        if event.e == "snapshot" or (
            self._book is not None and (epoch == self._epoch and seq == self._seq + 1)
        ):
            if event.e == "snapshot":
                self._book = LocalBook()
            assert self._book is not None
            try:
                self._book.apply(event)
            except (ValueError, ArithmeticError):  # a broken chain, a price that is no number
                self._book = None
                return False
        elif not self._seed(epoch, seq):
            return False
        self._epoch, self._seq, self._sorted = epoch, seq, None
        return True

    def _seed(self, epoch: str, seq: int) -> bool:
        current = self._current()
        if current is None or current.data is None or current.position != Position(epoch, seq):
            self._book = None
            return False
        self._book = LocalBook()
        try:
            self._book.apply(_depth.decode(current.data))
        except (ValueError, ArithmeticError):  # a state that does not check out: none
            self._book = None
            return False
        return True

    def top(self, levels: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        assert self._book is not None
        if self._sorted is None:  # once per event, whatever the number of views
            self._sorted = self._book.sorted()
        bids, asks = self._sorted
        return bids[:levels], asks[:levels]


class Mirrors:
    """One dialect's book mirrors, one per depth channel while a view reads it (the views hold
    it; it goes with the last of them)."""

    def __init__(self, current: Callable[[str], Snapshot | None]) -> None:
        self._current = current
        self._mirrors: weakref.WeakValueDictionary[str, BookMirror] = weakref.WeakValueDictionary()

    def get(self, internal: str) -> BookMirror:
        mirror = self._mirrors.get(internal)
        if mirror is None:
            mirror = BookMirror(functools.partial(self._current, internal))
            self._mirrors[internal] = mirror
        return mirror


class Translator:
    """One stream's payloads from its channel's native events (see the module docstring)."""

    def __init__(
        self, stream: Stream, market: Market, current: Current = lambda: None,
        mirror: BookMirror | None = None, *, clock: Callable[[], int] = wall_ms,
        epochs: EpochGuard = EPOCHS,
    ) -> None:  # fmt: skip
        """``mirror``: the book shared with the other views of the channel (else its own,
        seeded by ``current``); ``clock`` (ms since 1970) and ``epochs`` judge the depth
        channel's epochs."""
        self.stream = stream
        self.market = market
        self._clock = clock
        self._epochs = epochs
        self._mirror = (
            (mirror or BookMirror(current)) if stream.kind in ("partial", "bookTicker") else None
        )

    def __call__(self, epoch: str, seq: int, data: msgspec.Raw) -> list[bytes]:
        return [_encode(p) for p in self.payloads(epoch, seq, data)]

    @property
    def wants_state(self) -> bool:
        """A stream read off the book (partial depth, bookTicker) that has none now."""
        return self._mirror is not None and self._mirror.wants_state

    def offer_state(self, recovery: Recovery) -> None:
        if self._mirror is not None:
            self._mirror.offer(recovery)

    def payloads(self, epoch: str, seq: int, data: msgspec.Raw) -> list[dict[str, Any]]:
        kind, market = self.stream.kind, self.market
        if kind in ("depth", "partial", "bookTicker") and not admitted(
            epoch, self._clock(), self._epochs
        ):
            return []  # no id of an epoch from the future (the module docstring)
        if kind == "depth":
            event = _depth.decode(data)
            return [depth_update(event, market, epoch, seq)] if event.e == "depthUpdate" else []
        if kind in ("partial", "bookTicker"):
            return self._top(epoch, seq, _depth.decode(data))
        if kind in ("trade", "aggTrade"):
            return trades(_trades.decode(data), market, kind == "aggTrade")
        if kind == "miniTicker":
            return [mini_ticker(_ticker.decode(data))]
        if kind == "ticker":
            return [ticker(_ticker.decode(data), market)]
        if kind == "kline":
            candle = _candle.decode(data)
            return [{"e": "kline", "E": candle.closeTime if candle.closed else candle.openTime,
                     "s": candle.s, "k": kline_fields(candle)}]  # fmt: skip
        return [mark_price(_mark.decode(data))]

    def _top(self, epoch: str, seq: int, event: DepthEvent) -> list[dict[str, Any]]:
        assert self._mirror is not None
        if not self._mirror.apply(epoch, seq, event):
            return []
        uid = update_id(epoch, seq)
        if self.stream.kind == "bookTicker":
            (bids, asks) = self._mirror.top(1)
            bid, ask = bids[0] if bids else ("0", "0"), asks[0] if asks else ("0", "0")
            out: dict[str, Any] = {"u": uid, "s": event.s, "b": bid[0], "B": bid[1],
                                   "a": ask[0], "A": ask[1]}  # fmt: skip
            if self.market == "futures":
                out = {"e": "bookTicker", "u": uid, "E": event.T, "T": event.T, "s": event.s,
                       "b": bid[0], "B": bid[1], "a": ask[0], "A": ask[1]}  # fmt: skip
            return [out]
        bids, asks = self._mirror.top(self.stream.levels)
        if self.market == "spot":
            return [{"lastUpdateId": uid, "bids": bids, "asks": asks}]
        return [{"e": "depthUpdate", "E": event.T, "T": event.T, "s": event.s, "U": uid,
                 "u": uid, "pu": uid - 1, "b": bids, "a": asks}]  # fmt: skip
