"""The Binance dialect's sans-IO parts: stream names, paths, update ids, payloads, requests,
and the hub's views. No sockets."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs
from test_hub import frames
from upstream import Upstream

from pushd.binance.arrays import AllMarket
from pushd.binance.budget import MAX_ADDRESSES, Charge, RestBudget, message_cost, weight
from pushd.binance.dialect import Frames
from pushd.binance.ids import MAX_SAFE, EpochGuard, update_id
from pushd.binance.paths import accepts, opening
from pushd.binance.payloads import Mirrors, Translator
from pushd.binance.session import Session
from pushd.binance.streams import Market, Stream, parse
from pushd.bus.model import Entry, Position, Recovery, Snapshot, epoch_ms, new_epoch
from pushd.channels import Channel
from pushd.errors import InvalidStream
from pushd.gateway.hub import Hub, Outlet, text_frame
from pushd.market.depth import checksum

SYMBOLS = frozenset({"BTCUSDT", "ETHUSDT"})
EPOCH = new_epoch(1_795_000_000_000)
DAY_MS = 86_400_000


def raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(value))


def depth_event(
    e: str, bids: list[list[str]], asks: list[list[str]], after: Any = None, pu: int = 0
) -> msgspec.Raw:
    """A native depth event; its checksum is of ``after`` (the book after it; default: its
    own levels, as for a snapshot)."""
    book = after or (bids, asks)
    crc = checksum([tuple(lv) for lv in book[0]], [tuple(lv) for lv in book[1]])  # type: ignore[misc]
    return raw({"e": e, "s": "BTCUSDT", "U": pu + 1, "u": pu + 1, "pu": pu, "bids": bids,
                "asks": asks, "checksum": crc, "T": 1_795_000_000_123})  # fmt: skip


# -- stream names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "internal"),
    [
        ("btcusdt@depth", "depth", "depth_BTCUSDT"),
        ("btcusdt@depth@100ms", "depth", "depth_BTCUSDT"),
        ("btcusdt@depth@1000ms", "depth", "depth_BTCUSDT"),
        ("btcusdt@depth20@100ms", "partial", "depth_BTCUSDT"),
        ("btcusdt@depth5", "partial", "depth_BTCUSDT"),
        ("btcusdt@bookTicker", "bookTicker", "depth_BTCUSDT"),
        ("btcusdt@trade", "trade", "trades_BTCUSDT"),
        ("btcusdt@aggTrade", "aggTrade", "trades_BTCUSDT"),
        ("btcusdt@ticker", "ticker", "ticker_BTCUSDT"),
        ("btcusdt@miniTicker", "miniTicker", "ticker_BTCUSDT"),
        ("btcusdt@kline_1m", "kline", "kline_BTCUSDT"),
        ("ethusdt@kline_4h", "kline", "kline_ETHUSDT_4h"),
        ("btcusdt@markPrice", "markPrice", "markprice_BTCUSDT"),
        ("btcusdt@markPrice@1s", "markPrice", "markprice_BTCUSDT"),
        ("BTCUSDT@trade", "trade", "trades_BTCUSDT"),  # the symbol in any case; echoed lower
    ],
)
def test_stream_names_map_to_pushd_channels(name: str, kind: str, internal: str) -> None:
    stream = parse(name, SYMBOLS, "futures")
    assert (stream.kind, stream.internal) == (kind, internal)
    assert stream.name == name[: name.index("@")].lower() + name[name.index("@") :]


@pytest.mark.parametrize(
    "name",
    ["btcusdt@depth7", "btcusdt@depth@1s", "btcusdt@depth5@1000ms", "btcusdt@kline_7m",
     "btcusdt@kline", "btcusdt@trade@100ms", "btcusdt@trades", "xrpusdt@trade", "@trade",
     "btcusdt", "btcusdt@", "btcusdt@depth\u0665", "btcusdt@markPrice", "x" * 200,
     "btcusdt@ticker_1m", "btc usdt@trade",
     # leading zeros named streams of their own, a book mirror's view each
     "btcusdt@depth05", "btcusdt@depth0020@100ms", "btcusdt@depth010"],
)  # fmt: skip
def test_bad_stream_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidStream):
        parse(name, SYMBOLS, "spot")  # markPrice: USD-M only


# -- paths -------------------------------------------------------------------------------


def test_paths() -> None:
    for path in ("/ws", "/ws/0", "/ws/btcusdt@trade", "/stream", "/public/ws", "/market/stream",
                 "/ws/3/anything"):  # fmt: skip
        assert accepts(path), path
    for path in ("/", "/wss", "/public", "/api/ws", "/streams"):
        assert not accepts(path), path
    assert opening("/ws/1") == opening("/ws") == opening("/public/ws/0")
    assert not opening("/ws").combined and opening("/ws").streams == []
    assert opening("/ws/btcusdt@trade").streams == ["btcusdt@trade"]
    assert opening("/stream?streams=btcusdt@trade/ethusdt@depth@100ms").streams == [
        "btcusdt@trade", "ethusdt@depth@100ms"]  # fmt: skip
    assert opening("/market/stream").combined


# -- update ids ---------------------------------------------------------------------------


def test_update_ids_rise_by_one_per_event_and_across_epochs() -> None:
    assert epoch_ms(EPOCH) == 1_795_000_000_000
    assert update_id(EPOCH, 8) == update_id(EPOCH, 7) + 1
    later = new_epoch(1_795_000_000_001)  # a restart one ms later
    assert update_id(later, 1) > update_id(EPOCH, 999)  # a thousand events per ms to spare
    assert epoch_ms("deadbeef") == 0 and epoch_ms("0x" + "1" * 14) == 0  # old or foreign form
    assert update_id(new_epoch(), 10**6) < MAX_SAFE
    assert update_id(new_epoch(9_000_000_000_000), 10**6) < MAX_SAFE  # the year 2255


def test_an_epoch_a_day_ahead_of_the_clock_gives_out_no_id_and_is_logged_once() -> None:
    """An epoch stamped more than a day after this host's clock (a node whose clock ran far
    ahead) would number its events above every correct epoch after it, so that ccxt dropped
    those: its depth events are not sent (a visible break when a correct epoch follows), the
    refusal logged once; trades of the same time are not concerned (no update ids)."""
    now = 1_795_000_000_000
    guard = EpochGuard()
    ahead, near = new_epoch(now + DAY_MS + 1), new_epoch(now + DAY_MS)
    assert not guard.admits(ahead, now) and guard.admits(near, now)
    depth, book = (
        Translator(parse(name, SYMBOLS, "futures"), "futures", clock=lambda: now, epochs=guard)
        for name in ("btcusdt@depth", "btcusdt@bookTicker")
    )
    event = depth_event("depthUpdate", [["10", "1"]], [], pu=4)
    with capture_logs() as logs:
        assert depth.payloads(ahead, 5, event) == [] and depth.payloads(ahead, 6, event) == []
        snapshot = depth_event("snapshot", [["10", "1"]], [["11", "1"]], pu=4)
        assert book.payloads(ahead, 5, snapshot) == []
    assert [(e["event"].split(":")[0], e["epoch"]) for e in logs] == [("binance", ahead)]
    [sent] = depth.payloads(EPOCH, 7, event)  # a correct epoch: below the refused one's ids
    assert sent["u"] == update_id(EPOCH, 7) < update_id(ahead, 0)
    trades = Translator(parse("btcusdt@trade", SYMBOLS, "spot"), "spot", clock=lambda: now,
                        epochs=guard)  # fmt: skip
    batch = raw({"s": "BTCUSDT", "trades": [{"id": 1, "price": "1", "qty": "1", "side": "buy",
                                             "ts": 1}]})  # fmt: skip
    assert len(trades.payloads(ahead, 1, batch)) == 1
    with capture_logs() as logs:  # the clock caught up to within a day: admitted
        later = Translator(parse("btcusdt@depth", SYMBOLS, "futures"), "futures",
                           clock=lambda: now + 2, epochs=guard)  # fmt: skip
        assert [p["u"] for p in later.payloads(ahead, 8, event)] == [update_id(ahead, 8)]
    assert logs == []


# -- payloads -----------------------------------------------------------------------------


def test_a_batch_of_n_trades_is_n_payloads_with_strings_and_integers() -> None:
    batch = raw({"s": "BTCUSDT", "trades": [
        {"id": 7, "price": "65000.1", "qty": "0.5", "side": "buy", "ts": 1},
        {"id": 8, "price": "65000.2", "qty": "0.25", "side": "sell", "ts": 2}]})  # fmt: skip
    spot = Translator(parse("btcusdt@trade", SYMBOLS, "spot"), "spot")
    out = [msgspec.json.decode(p) for p in spot(EPOCH, 3, batch)]
    assert out == [
        {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 7, "p": "65000.1", "q": "0.5", "T": 1,
         "m": False, "M": True},
        {"e": "trade", "E": 2, "s": "BTCUSDT", "t": 8, "p": "65000.2", "q": "0.25", "T": 2,
         "m": True, "M": True},
    ]  # fmt: skip
    agg = Translator(parse("btcusdt@aggTrade", SYMBOLS, "futures"), "futures")
    [first, _] = [msgspec.json.decode(p) for p in agg(EPOCH, 3, batch)]
    assert first["a"] == first["f"] == first["l"] == 7 and "M" not in first


def test_depth_diffs_chain_by_update_id_and_snapshots_are_not_sent() -> None:
    spot = Translator(parse("btcusdt@depth@100ms", SYMBOLS, "spot"), "spot")
    futures = Translator(parse("btcusdt@depth", SYMBOLS, "futures"), "futures")
    diff = depth_event("depthUpdate", [["1.5", "2"]], [["1.6", "0"]])
    assert spot(EPOCH, 5, depth_event("snapshot", [], [])) == []
    a, b = (msgspec.json.decode(spot(EPOCH, seq, diff)[0]) for seq in (6, 7))
    assert b["U"] == a["u"] + 1 and a["U"] == a["u"] and "pu" not in a
    assert a["b"] == [["1.5", "2"]] and a["E"] == 1_795_000_000_123
    assert a["a"] == [["1.6", "0.00000000"]]  # spot's removed level, as python-binance needs
    c, d = (msgspec.json.decode(futures(EPOCH, seq, diff)[0]) for seq in (6, 7))
    assert d["pu"] == c["u"] and c["T"] == 1_795_000_000_123
    assert list(c) == ["e", "E", "T", "s", "U", "u", "pu", "b", "a"]


def test_partial_depth_and_book_ticker_read_a_mirror_seeded_by_the_current_state() -> None:
    book = depth_event("snapshot", [["10", "1"], ["9", "2"]], [["11", "3"], ["12", "4"]])
    current: list[Snapshot | None] = [None]
    partial = Translator(parse("btcusdt@depth5", SYMBOLS, "spot"), "spot", lambda: current[0])
    top = Translator(parse("btcusdt@bookTicker", SYMBOLS, "spot"), "spot", lambda: current[0])
    after = ([["9.5", "5"], ["9", "2"]], [["11", "3"], ["12", "4"]])
    diff = depth_event("depthUpdate", [["10", "0"], ["9.5", "5"]], [], after, pu=1)
    assert partial(EPOCH, 4, diff) == []  # no state at seq 4: nothing to show
    current[0] = Snapshot(Position(EPOCH, 5), book)  # the book after the event of seq 5
    [p] = [msgspec.json.decode(x) for x in partial(EPOCH, 5, diff)]  # seeded: the state at 5
    assert p == {"lastUpdateId": update_id(EPOCH, 5), "bids": [["10", "1"], ["9", "2"]],
                 "asks": [["11", "3"], ["12", "4"]]}  # fmt: skip
    [t] = [msgspec.json.decode(x) for x in top(EPOCH, 5, diff)]
    assert (t["b"], t["B"], t["a"], t["A"]) == ("10", "1", "11", "3")
    [p] = [msgspec.json.decode(x) for x in partial(EPOCH, 6, diff)]  # the diff on the mirror
    assert p["bids"] == [["9.5", "5"], ["9", "2"]] and p["lastUpdateId"] == update_id(EPOCH, 6)
    assert partial(EPOCH, 9, diff) == []  # 7 and 8 never came: no book until a state


def test_a_mirror_without_a_book_takes_the_state_the_bus_offers() -> None:
    """On a gateway node (no book in process) the hub says the view wants a state, and hands it
    the one the bus read: the stored state and the diffs after it."""
    book = depth_event("snapshot", [["10", "1"]], [["11", "3"]])
    after = ([["10", "2"]], [["11", "3"]])
    diff = depth_event("depthUpdate", [["10", "2"]], [], after, pu=1)
    after2 = ([["10", "2"]], [["11", "4"]])
    diff2 = depth_event("depthUpdate", [], [["11", "4"]], after2, pu=2)
    hub = Hub()
    channel = Channel("depth_BTCUSDT", "btcusdt@bookTicker", private=False, symbol="BTCUSDT")
    outlet = Outlet(1 << 20)
    stream = parse("btcusdt@bookTicker", SYMBOLS, "spot")
    hub.join_view(outlet, channel, "k", lambda: Frames(stream, "spot", False, hub))
    assert hub.wants_state("depth_BTCUSDT")
    hub.publish("depth_BTCUSDT", EPOCH, 6, diff)  # no book: nothing sent
    assert outlet.out == b""
    stored = Recovery(Position(EPOCH, 6), False, current=(Entry(5, book), Entry(6, diff)))
    hub.offer_state("depth_BTCUSDT", stored)
    assert not hub.wants_state("depth_BTCUSDT")
    hub.publish("depth_BTCUSDT", EPOCH, 7, diff2)
    [top] = frames(bytes(outlet.out))
    assert (top["u"], top["b"], top["B"], top["A"]) == (update_id(EPOCH, 7), "10", "2", "4")


def test_the_views_of_one_book_share_one_mirror() -> None:
    """Each partial-depth and bookTicker view kept a book of its own, applied (its checksum
    sorts the whole book) and sorted again for its top on every event: a client naming
    depth5|10|20 at four rates and bookTicker, raw and combined (26 views of one book, more
    with leading zeros) made each depth event cost 26 times the work of one. One mirror per
    channel: seeded once, moved and sorted once per event, read by every view."""
    book = depth_event("snapshot", [["10", "1"], ["9", "2"]], [["11", "3"], ["12", "4"]])
    after = ([["9.5", "5"], ["9", "2"]], [["11", "3"], ["12", "4"]])
    diff = depth_event("depthUpdate", [["10", "0"], ["9.5", "5"]], [], after, pu=1)
    seeded: list[str] = []

    def current(internal: str) -> Snapshot:
        seeded.append(internal)
        return Snapshot(Position(EPOCH, 5), book)

    hub = Hub(upstream=Upstream(current))
    mirrors = Mirrors(hub.current)
    outlets: dict[tuple[str, bool], Outlet] = {}
    for name in ("btcusdt@depth5", "btcusdt@depth20@100ms", "btcusdt@bookTicker"):
        stream = parse(name, SYMBOLS, "spot")
        channel = Channel("depth_BTCUSDT", name, private=False, symbol="BTCUSDT")
        for combined in (False, True):
            outlet = outlets[name, combined] = Outlet(1 << 20)
            make = functools.partial(Frames, stream, "spot", combined, hub, mirrors)
            hub.join_view(outlet, channel, (name, combined), make)
    hub.publish("depth_BTCUSDT", EPOCH, 5, diff)  # seeded by the state at 5
    hub.publish("depth_BTCUSDT", EPOCH, 6, diff)  # the diff on the mirror
    assert seeded == ["depth_BTCUSDT"]
    for (name, combined), outlet in outlets.items():
        got = [f["data"] if combined else f for f in frames(bytes(outlet.out))]
        if name.endswith("bookTicker"):
            assert [(t["u"], t["b"]) for t in got] == [
                (update_id(EPOCH, 5), "10"), (update_id(EPOCH, 6), "9.5")]  # fmt: skip
        else:
            assert [(p["lastUpdateId"], p["bids"][0][0]) for p in got] == [
                (update_id(EPOCH, 5), "10"), (update_id(EPOCH, 6), "9.5")]  # fmt: skip


def test_tickers_klines_and_mark_price() -> None:
    ticker = raw({"s": "BTCUSDT", "open": "100", "high": "110", "low": "90", "last": "105",
                  "volume": "2", "quoteVolume": "210", "change": "5", "changePercent": "5.000",
                  "count": 3, "firstId": 1, "lastId": 3, "openTime": 60_000,
                  "closeTime": 86_460_000, "lastQty": "0.250", "bidPrice": "104.5",
                  "bidQty": "2", "askPrice": "105.5", "askQty": "3"})  # fmt: skip
    [mini] = Translator(parse("btcusdt@miniTicker", SYMBOLS, "spot"), "spot").payloads(
        EPOCH, 1, ticker
    )
    assert mini == {"e": "24hrMiniTicker", "E": 86_460_000, "s": "BTCUSDT", "c": "105",
                    "o": "100", "h": "110", "l": "90", "v": "2", "q": "210"}  # fmt: skip
    [full] = Translator(parse("btcusdt@ticker", SYMBOLS, "spot"), "spot").payloads(EPOCH, 1, ticker)
    assert (full["w"], full["F"], full["L"], full["n"]) == ("105.00000000", 1, 3, 3)
    assert (full["Q"], full["b"], full["B"], full["a"], full["A"]) == (
        "0.250", "104.5", "2", "105.5", "3")  # fmt: skip
    [fut] = Translator(parse("btcusdt@ticker", SYMBOLS, "futures"), "futures").payloads(
        EPOCH, 1, ticker)  # fmt: skip
    assert "b" not in fut and "x" not in fut and fut["Q"] == "0.250"
    fields = {"s": "BTCUSDT", "i": "1m", "openTime": 0, "closeTime": 59_999, "open": "1",
              "high": "2", "low": "1", "close": "2", "volume": "3", "quoteVolume": "5",
              "count": 2, "closed": True}  # fmt: skip
    candle = raw({**fields, "firstId": 41, "lastId": 42, "takerBuyVolume": "1",
                  "takerBuyQuoteVolume": "2"})  # fmt: skip
    kline = Translator(parse("btcusdt@kline_1m", SYMBOLS, "spot"), "spot")
    [k] = kline.payloads(EPOCH, 1, candle)
    assert k["e"] == "kline" and k["k"]["x"] is True and k["k"]["t"] == 0 and k["k"]["c"] == "2"
    assert (k["k"]["f"], k["k"]["L"], k["k"]["V"], k["k"]["Q"]) == (41, 42, "1", "2")
    [old] = kline.payloads(EPOCH, 2, raw(fields))  # stored by a pushd that did not count them
    assert (old["k"]["f"], old["k"]["L"], old["k"]["V"], old["k"]["Q"]) == (-1, -1, "0", "0")
    mark = raw({"s": "BTCUSDT", "markPrice": "1.5", "indexPrice": "1.4",
                "estimatedSettlePrice": "1.45", "fundingRate": "0.0001", "premiumIndex": "0",
                "nextFundingTime": 28_800_000, "T": 5})  # fmt: skip
    stream = parse("btcusdt@markPrice@1s", SYMBOLS, "futures")
    [m] = Translator(stream, "futures").payloads(EPOCH, 1, mark)
    assert m == {"e": "markPriceUpdate", "E": 5, "s": "BTCUSDT", "p": "1.5", "i": "1.4",
                 "P": "1.45", "r": "0.0001", "T": 28_800_000}  # fmt: skip


# -- requests -----------------------------------------------------------------------------


def reply(session: Session, request: Any) -> Any:
    text = request if isinstance(request, str) else msgspec.json.encode(request).decode()
    return msgspec.json.decode(session.handle(text).reply)


def test_requests_and_replies() -> None:
    session = Session(SYMBOLS, "spot", 1024, combined=False)
    sub = {"method": "SUBSCRIBE", "params": ["btcusdt@trade", "ethusdt@depth"], "id": 1}
    step = session.handle(msgspec.json.encode(sub).decode())
    assert msgspec.json.decode(step.reply) == {"result": None, "id": 1}
    assert [s.name for s in step.join] == ["btcusdt@trade", "ethusdt@depth"]
    again = session.handle(msgspec.json.encode({**sub, "id": 2}).decode())
    assert again.join == [] and msgspec.json.decode(again.reply) == {"result": None, "id": 2}
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert reply(session, {"method": "LIST_SUBSCRIPTIONS", "id": uuid}) == {
        "result": ["btcusdt@trade", "ethusdt@depth"], "id": uuid}  # fmt: skip
    assert reply(session, {"method": "GET_PROPERTY", "params": ["combined"], "id": None}) == {
        "result": False, "id": None}  # fmt: skip
    step = session.handle('{"method":"SET_PROPERTY","params":["combined",true],"id":3}')
    assert step.reform and session.combined
    left = session.handle(
        '{"method":"UNSUBSCRIBE","params":["btcusdt@trade","btcusdt@ticker"],"id":4}'
    )
    assert [s.name for s in left.leave] == ["btcusdt@trade"]
    assert reply(session, {"method": "SUBSCRIBE", "params": [], "id": 2**63 - 1})["result"] is None


@pytest.mark.parametrize(
    ("request_text", "code", "request_id"),
    [
        ("not json", 3, None),
        ("[1,2]", 3, None),
        ('{"method":"SUBSCRIBE","params":["btcusdt@nope"],"id":7}', 2, 7),
        ('{"method":"SUBSCRIBE","params":["btcusdt@trade","x"],"id":7}', 2, 7),  # all or none
        ('{"method":"SUBSCRIBE","params":"btcusdt@trade","id":7}', 2, 7),
        ('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":' + str(2**63) + "}", 2, None),
        ('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":"' + "u" * 37 + '"}', 2, None),
        ('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":true}', 2, None),
        ('{"method":"DANCE","id":8}', 2, 8),
        ('{"method":"SET_PROPERTY","params":["colour",true],"id":9}', 0, 9),
        ('{"method":"SET_PROPERTY","params":["combined","yes"],"id":9}', 1, 9),
    ],
)
def test_errors_are_nested_and_echo_the_id(request_text: str, code: int, request_id: Any) -> None:
    session = Session(SYMBOLS, "spot", 1024, combined=False)
    answer = reply(session, request_text)
    assert set(answer) == {"error", "id"} and answer["id"] == request_id
    assert answer["error"]["code"] == code and isinstance(answer["error"]["msg"], str)
    assert session.streams == {}


def test_stream_limit_is_all_or_nothing() -> None:
    session = Session(SYMBOLS, "spot", 3, combined=False)
    names = ["btcusdt@trade", "btcusdt@ticker", "btcusdt@kline_1m", "btcusdt@aggTrade"]
    answer = reply(session, {"method": "SUBSCRIBE", "params": names, "id": 1})
    assert answer["error"]["code"] == 2 and session.streams == {}


# -- the hub's views ----------------------------------------------------------------------


def test_a_view_encodes_each_event_once_for_all_its_subscribers() -> None:
    upstream = Upstream()
    hub = Hub(upstream=upstream)
    channel = Channel("trades_BTCUSDT", "btcusdt@trade", private=False, symbol="BTCUSDT")
    calls: list[int] = []

    def encoder() -> Any:
        def encode(epoch: str, seq: int, data: msgspec.Raw) -> bytes:
            calls.append(seq)
            return text_frame(b'{"n":%d}' % seq) * 2  # two frames for one event

        return encode

    outlets = [Outlet(10_000) for _ in range(3)]
    for outlet in outlets:
        hub.join_view(outlet, channel, "key", encoder)
    native = Outlet(10_000)
    hub.subscribe(native, channel)
    hub.publish("trades_BTCUSDT", EPOCH, 1, raw({"s": "BTCUSDT", "trades": []}))
    assert calls == [1]  # once, whatever the number of subscribers
    for outlet in outlets:
        assert frames(bytes(outlet.out)) == [{"n": 1}, {"n": 1}]
    assert frames(bytes(native.out))[0]["event"] == "btcusdt@trade"  # the native frame too
    assert hub.subscriber_count("trades_BTCUSDT") == 4
    for outlet in outlets:
        hub.leave_view(outlet, "trades_BTCUSDT", "key")
    hub.unsubscribe(native, "trades_BTCUSDT")
    assert upstream.followed == upstream.left == ["trades_BTCUSDT"]
    assert hub.subscriber_count("trades_BTCUSDT") == 0


def test_a_view_subscriber_with_no_room_is_marked_slow() -> None:
    hub = Hub()
    channel = Channel("trades_BTCUSDT", "btcusdt@trade", private=False, symbol="BTCUSDT")
    small, roomy = Outlet(4096), Outlet(1 << 20)
    for outlet in (small, roomy):
        hub.join_view(outlet, channel, "k", lambda: lambda _e, _s, _d: text_frame(b"x" * 3000))
    for seq in (1, 2):
        hub.publish("trades_BTCUSDT", EPOCH, seq, raw({}))
    assert small.slow and small in hub.take_dirty() and len(small.out) < 4096
    assert not roomy.slow and len(roomy.out) > 6000


def test_a_slow_view_subscriber_gets_nothing_after_the_event_it_lost() -> None:
    """A view subscriber with no room for an event is marked slow (closed by the flusher);
    a smaller event after it still fit and was queued, and a drain running meanwhile wrote
    it: the client read past a hole before the close."""
    hub = Hub()
    channel = Channel("trades_BTCUSDT", "btcusdt@trade", private=False, symbol="BTCUSDT")
    sizes = {1: 3000, 2: 3000, 3: 10}
    outlet = Outlet(4096)
    hub.join_view(outlet, channel, "k",
                  lambda: lambda _e, seq, _d: text_frame(b'{"n":%d,"x":"%s"}' % (
                      seq, b"x" * sizes[seq])))  # fmt: skip
    for seq in (1, 2, 3):
        hub.publish("trades_BTCUSDT", EPOCH, seq, raw({}))
    assert outlet.slow
    assert [f["n"] for f in frames(bytes(outlet.out))] == [1]


def test_a_stream_is_a_value() -> None:
    stream = parse("btcusdt@trade", SYMBOLS, "spot")
    assert stream == Stream("btcusdt@trade", "BTCUSDT", "trade", "trades_BTCUSDT")


# -- the REST request budget ---------------------------------------------------------------


def test_the_rest_budget_is_per_address_refills_and_forgets_the_least_recent() -> None:
    budget = RestBudget(per_minute=2)  # a bucket of 2, one more each 30 s
    assert budget.take("a", 0.0) == Charge(1) and budget.take("a", 0.0) == Charge(2)
    assert budget.take("a", 0.0) == Charge(2, 30)  # Retry-After: one token's refill
    assert budget.take("b", 0.0) == Charge(1)  # another address has its own
    assert budget.take("a", 30.0) == Charge(2)
    for n in range(MAX_ADDRESSES):  # "a" is the least recently seen: forgotten, full again
        budget.take(f"x{n}", 30.0)
    assert budget.take("a", 30.0) == Charge(1) and budget.take("a", 30.0) == Charge(2)
    budget.retune(0)  # no budget: nothing counted, nothing refused
    assert all(budget.take("a", 30.0) == Charge() for _ in range(10))


def test_rest_weights_are_binances_and_a_heavy_request_waits_for_them() -> None:
    """A request takes its route's weight (Binance's, by market, ``limit`` and ``symbol``);
    refused, it is told to wait until its weight has refilled; one heavier than the whole
    budget takes the whole of it (it waits for a full bucket, not for ever)."""

    def by_limit(market: Market, route: str, *limits: str) -> list[int]:
        return [weight(market, route, {"limit": n}) for n in limits]

    assert by_limit("spot", "depth", "5", "100", "101", "1000", "9999") == [5, 5, 25, 50, 250]
    assert weight("spot", "depth", {}) == 5 and weight("spot", "depth", {"limit": "x"}) == 5
    assert by_limit("futures", "depth", "5", "50", "100", "500", "1000") == [2, 2, 5, 10, 20]
    assert by_limit("futures", "klines", "1", "99", "100", "1000", "1500") == [1, 1, 2, 5, 10]
    assert weight("futures", "klines", {}) == 5  # the default limit is 500
    assert (weight("spot", "exchangeInfo", {}), weight("futures", "exchangeInfo", {})) == (20, 1)
    assert (weight("spot", "trades", {}), weight("spot", "aggTrades", {}),
            weight("spot", "klines", {})) == (25, 4, 2)  # fmt: skip
    assert (weight("futures", "trades", {}), weight("futures", "aggTrades", {})) == (5, 20)
    every = {"symbol": "BTCUSDT"}
    assert (weight("spot", "ticker/24hr", every), weight("spot", "ticker/24hr", {})) == (2, 80)
    assert (weight("futures", "ticker/24hr", every), weight("futures", "ticker/24hr", {})) == (
        1, 40)  # fmt: skip
    assert (weight("futures", "premiumIndex", every), weight("futures", "premiumIndex", {})) == (
        1, 10)  # fmt: skip
    budget = RestBudget(per_minute=60)  # one a second
    assert budget.take("a", 0.0, 50) == Charge(50)
    assert budget.take("a", 0.0, 25) == Charge(50, 15)  # 10 held: 15 more to refill
    assert budget.take("a", 15.0, 25) == Charge(60)
    assert budget.take("a", 15.0, 250) == Charge(60, 60)  # heavier than the budget: all of it
    assert budget.take("a", 75.0, 250) == Charge(60)


@pytest.mark.parametrize(("streams", "cost"), [(0, 1), (1, 1), (100, 1), (101, 2), (1024, 11)])
def test_a_subscribe_costs_a_message_token_per_hundred_streams(streams: int, cost: int) -> None:
    assert message_cost(streams) == cost
    session = Session(SYMBOLS, "spot", 1024, combined=False)
    names = [f"btcusdt@kline_{iv}" for iv in ("1m", "5m")] * 600
    request = {"method": "SUBSCRIBE", "params": names[:streams], "id": 1}
    assert session.handle(msgspec.json.encode(request).decode()).cost == cost


def test_a_channel_only_views_follow_is_not_framed_for_pushd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The native frame of an event is built for pushd's own subscribers only: a channel that
    only Binance views follow cost an encode per event for nobody (the hot path)."""
    import pushd.gateway.hub as hub_module

    encoded: list[int] = []
    real = hub_module.encode_event

    def counting(*args: Any) -> bytes:
        encoded.append(1)
        return real(*args)

    monkeypatch.setattr(hub_module, "encode_event", counting)
    hub = Hub()
    woken: list[int] = []
    hub.on_dirty = lambda: woken.append(1)
    channel = Channel("trades_BTCUSDT", "btcusdt@trade", private=False, symbol="BTCUSDT")
    outlet = Outlet(10_000)
    hub.join_view(outlet, channel, "k", lambda: lambda _e, seq, _d: text_frame(b"%d" % seq))
    hub.publish("trades_BTCUSDT", EPOCH, 1, raw({"s": "BTCUSDT", "trades": []}))
    assert bytes(outlet.out) == text_frame(b"1") and hub.take_dirty() == [outlet]
    assert woken == [1] and encoded == []
    native = Outlet(10_000)
    hub.subscribe(native, channel)
    hub.publish("trades_BTCUSDT", EPOCH, 2, raw({"s": "BTCUSDT", "trades": []}))
    assert encoded == [1] and frames(bytes(native.out))[-1]["seq"] == 2


# -- all-market streams (!ticker@arr, !miniTicker@arr, !markPrice@arr) ---------------------


def ticker_data(symbol: str, last: str) -> msgspec.Raw:
    return raw({"s": symbol, "open": "100", "high": "110", "low": "90", "last": last,
                "volume": "2", "quoteVolume": "210", "change": "5", "changePercent": "5.000",
                "count": 3, "firstId": 1, "lastId": 3, "openTime": 60_000,
                "closeTime": 86_460_000})  # fmt: skip


def mark_data(symbol: str, price: str) -> msgspec.Raw:
    return raw({"s": symbol, "markPrice": price, "indexPrice": "1.4",
                "estimatedSettlePrice": "1.45", "fundingRate": "0.0001", "premiumIndex": "0",
                "nextFundingTime": 28_800_000, "T": 5})  # fmt: skip


@pytest.mark.parametrize(
    ("name", "market", "kind"),
    [
        ("!ticker@arr", "spot", "ticker"),
        ("!ticker@arr", "futures", "ticker"),
        ("!miniTicker@arr", "spot", "miniTicker"),
        ("!miniTicker@arr@1000ms", "spot", "miniTicker"),  # python-binance's spelling
        ("!miniTicker@arr", "futures", "miniTicker"),
        ("!markPrice@arr", "futures", "markPrice"),
        ("!markPrice@arr@1s", "futures", "markPrice"),
    ],
)
def test_all_market_stream_names(name: str, market: Any, kind: str) -> None:
    stream = parse(name, SYMBOLS, market)
    assert (stream.name, stream.kind, stream.every, stream.symbol) == (name, kind, True, "")


@pytest.mark.parametrize(
    ("name", "market"),
    [
        ("!markPrice@arr", "spot"),  # USD-M only
        ("!ticker@arr@1s", "spot"),
        ("!trade@arr", "spot"),
        ("!ticker", "spot"),
        ("!TICKER@arr", "spot"),
        ("!ticker@arrx", "futures"),
        ("!bookTicker@arr", "futures"),
    ],
)
def test_bad_all_market_stream_names_are_refused(name: str, market: Any) -> None:
    with pytest.raises(InvalidStream):
        parse(name, SYMBOLS, market)


def test_all_market_arrays_carry_the_symbols_changed_since_the_last_one() -> None:
    every = AllMarket[str]("spot")
    mini = parse("!miniTicker@arr", SYMBOLS, "spot")
    full = parse("!ticker@arr", SYMBOLS, "spot")
    assert every.follow(mini, False, "a") == "ticker"  # the first: tap the ticker channels
    assert every.follow(full, True, "b") is None
    assert every.follow(mini, False, "c") is None
    assert every.due() == []  # nothing changed: nothing sent
    every.changed("ticker", "BTCUSDT", ticker_data("BTCUSDT", "101"))
    every.changed("ticker", "ETHUSDT", ticker_data("ETHUSDT", "7"))
    every.changed("ticker", "BTCUSDT", ticker_data("BTCUSDT", "102"))  # the latest counts
    due = {frozenset(who): msgspec.json.decode(body) for body, who in every.due()}
    assert [(p["e"], p["s"], p["c"]) for p in due[frozenset("ac")]] == [
        ("24hrMiniTicker", "BTCUSDT", "102"), ("24hrMiniTicker", "ETHUSDT", "7")]  # fmt: skip
    combined = due[frozenset("b")]
    assert combined["stream"] == "!ticker@arr"
    assert [(p["e"], p["s"]) for p in combined["data"]] == [
        ("24hrTicker", "BTCUSDT"), ("24hrTicker", "ETHUSDT")]  # fmt: skip
    assert combined["data"][0]["w"] == "105.00000000"
    every.changed("ticker", "ETHUSDT", ticker_data("ETHUSDT", "8"))
    [(body, _)] = [d for d in every.due() if "a" in d[1]]
    assert [p["s"] for p in msgspec.json.decode(body)] == ["ETHUSDT"]  # only what changed
    assert every.unfollow(mini, False, "a") is None
    assert every.unfollow(mini, False, "c") is None
    assert every.unfollow(full, True, "b") == "ticker"  # the last: untap
    assert not every.follows()


def test_all_market_arrays_are_encoded_once_per_interval_whatever_the_followers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pushd.binance.arrays as arrays

    calls: list[int] = []
    real = arrays.mark_price
    monkeypatch.setattr(arrays, "mark_price", lambda m: calls.append(1) or real(m))
    every = AllMarket[int]("futures")
    plain = parse("!markPrice@arr", SYMBOLS, "futures")
    fast = parse("!markPrice@arr@1s", SYMBOLS, "futures")
    for n in range(100):
        every.follow(plain if n % 2 else fast, n % 3 == 0, n)
    every.changed("markPrice", "BTCUSDT", mark_data("BTCUSDT", "1.5"))
    every.changed("markPrice", "ETHUSDT", mark_data("ETHUSDT", "2"))
    every.changed("markPrice", "ETHUSDT", raw({"s": 1}))  # not a mark price: left out
    due = every.due()
    assert calls == [1]  # one payload made, one array encoded for the four streams and forms
    assert sum(len(who) for _body, who in due) == 100
    bodies = [msgspec.json.decode(body) for body, _who in due]
    arrays_sent = [b["data"] if isinstance(b, dict) else b for b in bodies]
    expected = [{"e": "markPriceUpdate", "E": 5, "s": "BTCUSDT", "p": "1.5", "i": "1.4",
                 "P": "1.45", "r": "0.0001", "T": 28_800_000}]  # fmt: skip
    assert all(a == expected for a in arrays_sent)
    assert {b["stream"] for b in bodies if isinstance(b, dict)} == {plain.name, fast.name}
    assert every.unreadable == 1


def test_a_tap_sees_every_event_of_a_channel_and_is_no_subscriber() -> None:
    upstream = Upstream()
    hub = Hub(upstream=upstream)
    channel = Channel("ticker_BTCUSDT", "BTCUSDT@ticker", private=False, symbol="BTCUSDT")
    seen: list[int] = []
    hub.tap(channel, "k", lambda _e, seq, _d: seen.append(seq))
    hub.publish("ticker_BTCUSDT", EPOCH, 1, raw({}))
    native = Outlet(10_000)
    hub.subscribe(native, channel)
    hub.publish("ticker_BTCUSDT", EPOCH, 2, raw({}))
    assert seen == [1, 2] and hub.subscriber_count("ticker_BTCUSDT") == 1
    hub.unsubscribe(native, "ticker_BTCUSDT")
    assert upstream.left == []  # the tap still follows it
    hub.untap("ticker_BTCUSDT", "k")
    assert upstream.followed == upstream.left == ["ticker_BTCUSDT"]


def test_frames_delivered_to_many_outlets_mark_the_full_ones_slow() -> None:
    hub = Hub()
    woken: list[int] = []
    hub.on_dirty = lambda: woken.append(1)
    small, roomy = Outlet(100), Outlet(10_000)
    frame = text_frame(b"x" * 200)
    assert hub.deliver([small, roomy], frame) == 1
    assert small.slow and bytes(roomy.out) == frame
    assert woken == [1] and set(hub.take_dirty()) == {small, roomy}
