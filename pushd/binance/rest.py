"""The Binance surfaces' REST market data, on pushd's HTTP port.

Spot under ``/api/v3``, USD-M under ``/fapi/v1``; ``/dapi/v1/exchangeInfo`` answers
``{"symbols":[]}`` (ccxt loads COIN-M markets by default; none are served). Every answer is
read from the native endpoints' snapshots (``pushd.http.api``: the state with its position,
in process or from Redis), so the REST and the streams agree by id: ``depth``'s
``lastUpdateId`` is the update id (``pushd.binance.ids``) of the depth event whose book it is.
Errors: Binance's body, ``{"code":-1121,"msg":"Invalid symbol."}`` with 400.

Parameters as Binance reads them (``LIMITS``): ``limit`` defaults and bounds per route and
market (USD-M depth only 5, 10, 20, 50, 100, 500 or 1000; spot depth past 5,000 answers 5,000);
a ``limit`` that is no number is -1100, one out of range -1130, an unknown interval -1120;
``aggTrades``' ``fromId`` and ``aggTrades``' and ``klines``' ``startTime``, ``endTime`` choose
the window (``window``; one that is no integer -1100). Every
answer carries the address's used request weight (``pushd.binance.budget``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pushd.binance.budget import RestBudget, weight
from pushd.binance.ids import update_id
from pushd.binance.payloads import admitted, kline_fields, weighted_average
from pushd.binance.streams import Market
from pushd.bus.model import Position
from pushd.channels import KLINE_INTERVALS, market_channel
from pushd.config import Config, MarketConfig
from pushd.errors import ApiError, BinanceError, BusUnavailable
from pushd.market.depth import DepthEvent, LocalBook
from pushd.market.funding import MarkPriceData
from pushd.market.kline import Candle
from pushd.market.markets import wall_ms
from pushd.market.ticker import TickerData
from pushd.market.trades import TradeItem

if TYPE_CHECKING:
    from pushd.bus.backplane import Backplane
    from pushd.http.api import HttpApi

T = TypeVar("T")
S = TypeVar("S", TickerData, MarkPriceData)  # a symbol's whole state, naming it in "s"
QUOTES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "DAI", "BTC", "ETH", "BNB", "EUR", "USD", "TRY")
DEFAULT_TICK, DEFAULT_STEP, DEFAULT_MIN_NOTIONAL = "0.01", "0.00001", "5"
DELIVERY_PERPETUAL = 4133404800000  # Binance's deliveryDate of a perpetual (2100-12-25)
INVALID_SYMBOL = (-1121, "Invalid symbol.")
# a book whose epoch begins a day after our clock (``pushd.binance.ids``): no id given out
FUTURE_EPOCH = (-1001, "Internal error; unable to process your request. Please try again.", 503)
TOO_MANY = ("Too much request weight used; current limit is %d request weight per 1 MINUTE. "
            "Please use WebSocket Streams for live updates to avoid polling the API.")  # fmt: skip
USED_WEIGHT = ("x-mbx-used-weight", "x-mbx-used-weight-1m")  # the headers, as Binance writes them
LEGAL_LIMIT = "^[0-9]{1,20}$"
LEGAL_LONG = "^-?[0-9]{1,20}$"
WINDOW = ("fromId", "startTime", "endTime")  # the parameters ``window`` reads
BAD_LIMIT = (-1130, "Data sent for parameter 'limit' is not valid.")
FUTURES_DEPTHS = (5, 10, 20, 50, 100, 500, 1000)


class Limit(msgspec.Struct, frozen=True):
    """A route's ``limit``: its default, its maximum, and either the values allowed (USD-M
    depth) or whether a larger one is cut to the maximum (spot depth) rather than refused."""

    default: int
    most: int
    valid: tuple[int, ...] = ()
    cut: bool = False


LIMITS: dict[tuple[Market, str], Limit] = {
    ("spot", "depth"): Limit(100, 5000, cut=True),
    ("futures", "depth"): Limit(500, 1000, FUTURES_DEPTHS),
    ("spot", "trades"): Limit(500, 1000), ("futures", "trades"): Limit(500, 1000),
    ("spot", "aggTrades"): Limit(500, 1000), ("futures", "aggTrades"): Limit(500, 1000),
    ("spot", "klines"): Limit(500, 1000), ("futures", "klines"): Limit(500, 1500),
}  # fmt: skip


def read_limit(text: str | None, limit: Limit) -> int:
    """A ``limit`` parameter as Binance reads it (``LIMITS``); BinanceError -1100 / -1130."""
    if text is None:
        return limit.default
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise BinanceError(
            -1100, f"Illegal characters found in parameter 'limit'; legal range is '{LEGAL_LIMIT}'."
        )
    value = int(text)
    if limit.cut and value > limit.most:
        return limit.most
    if value < 1 or value > limit.most or (limit.valid and value not in limit.valid):
        raise BinanceError(*BAD_LIMIT)
    return value


def read_long(request: Request, name: str) -> int | None:
    """An integer parameter (``fromId``, ``startTime``, ``endTime``), None when absent;
    BinanceError -1100 when it is no integer."""
    text = request.query_params.get(name)
    if text is None:
        return None
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        raise BinanceError(
            -1100, f"Illegal characters found in parameter '{name}'; legal range is '{LEGAL_LONG}'."
        )
    return int(text)


def window(request: Request, items: list[T], key: Callable[[T], int], limit: int,
           from_id: Callable[[T], int] | None = None) -> list[T]:  # fmt: skip
    """``items`` (oldest first) as Binance chooses them: from ``fromId`` (``from_id``: the
    item's id) or ``startTime`` the oldest ``limit`` on, up to ``endTime``; with neither start
    the latest ``limit``."""
    first = read_long(request, "fromId") if from_id is not None else None
    start, end = read_long(request, "startTime"), read_long(request, "endTime")
    chosen = [
        item for item in items
        if (first is None or from_id is None or from_id(item) >= first)
        and (start is None or key(item) >= start) and (end is None or key(item) <= end)
    ]  # fmt: skip
    return chosen[:limit] if first is not None or start is not None else chosen[-limit:]


_depth = msgspec.json.Decoder(DepthEvent)


class SymbolInfo(msgspec.Struct, frozen=True):
    symbol: str
    base: str
    quote: str
    tick_size: str
    step_size: str
    min_notional: str


def symbol_info(symbol: str, market: MarketConfig) -> SymbolInfo:
    """The symbol's metadata: the config's, else derived from its name (a known quote suffix;
    the rest is the base asset)."""
    quote = market.quote_asset or next(
        (q for q in QUOTES if symbol.endswith(q) and len(symbol) > len(q)), symbol[-4:]
    )
    base = market.base_asset or symbol.removesuffix(quote) or symbol
    return SymbolInfo(
        symbol, base, quote, market.tick_size or DEFAULT_TICK, market.step_size or DEFAULT_STEP,
        market.min_notional or DEFAULT_MIN_NOTIONAL,
    )  # fmt: skip


def _precision(step: str) -> int:
    exponent = Decimal(step).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 8


def exchange_symbol(info: SymbolInfo, market: Market) -> dict[str, Any]:
    """One symbol of exchangeInfo: PRICE_FILTER first (cryptofeed reads filters[0])."""
    filters: list[dict[str, Any]] = [
        {"filterType": "PRICE_FILTER", "minPrice": info.tick_size, "maxPrice": "1000000000",
         "tickSize": info.tick_size},
        {"filterType": "LOT_SIZE", "minQty": info.step_size, "maxQty": "1000000000",
         "stepSize": info.step_size},
    ]  # fmt: skip
    common = {"symbol": info.symbol, "status": "TRADING", "baseAsset": info.base,
              "quoteAsset": info.quote, "baseAssetPrecision": 8, "quotePrecision": 8}  # fmt: skip
    if market == "spot":
        filters.append({"filterType": "NOTIONAL", "minNotional": info.min_notional,
                        "applyMinToMarket": True, "maxNotional": "9000000000",
                        "applyMaxToMarket": False, "avgPriceMins": 5})  # fmt: skip
        return {**common, "quoteAssetPrecision": 8, "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8, "orderTypes": ["LIMIT", "MARKET"],
                "icebergAllowed": False, "ocoAllowed": False, "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False, "filters": filters, "permissions": ["SPOT"],
                "permissionSets": [["SPOT"]]}  # fmt: skip
    filters.append({"filterType": "MIN_NOTIONAL", "notional": info.min_notional})
    return {**common, "pair": info.symbol, "contractType": "PERPETUAL",
            "deliveryDate": DELIVERY_PERPETUAL, "onboardDate": 1569398400000,
            "marginAsset": info.quote, "pricePrecision": _precision(info.tick_size),
            "quantityPrecision": _precision(info.step_size), "underlyingType": "COIN",
            "settlePlan": 0, "triggerProtect": "0.0500", "filters": filters,
            "orderTypes": ["LIMIT", "MARKET"],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX"]}  # fmt: skip


def _as(value: Any, kind: type[T]) -> T:
    """A native snapshot's data (a Struct in process, plain data from Redis) as ``kind``."""
    return msgspec.convert(msgspec.to_builtins(value), kind)


def _each_as(values: Any, kind: type[T]) -> list[T]:
    """The items of a native snapshot's list that read as ``kind`` (Redis is not trusted: one
    that does not is left out, not the answer)."""
    out = []
    for value in msgspec.to_builtins(values) if isinstance(values, list) else []:
        try:
            out.append(msgspec.convert(value, kind))
        except msgspec.ValidationError:
            continue
    return out


class BinanceRest:
    """The REST routes of both surfaces, over the native snapshot endpoints of ``api``."""

    def __init__(self, config: Config, api: HttpApi, backplane: Backplane) -> None:
        self._config = config
        self._api = api
        self._backplane = backplane
        self._budget = RestBudget(config.binance.rest_weight_per_minute)

    async def depth_state(self, symbol: str) -> tuple[Position, DepthEvent] | None:
        """The symbol's book and the position of the depth event it is the book of, standing
        where the stream stands (the backplane's ``latest_state``: this process's book, or on
        a node without it the state the compute node stored and the diffs after it). None: no
        book yet."""
        internal = market_channel("depth", symbol)
        try:
            recovery = await self._backplane.latest_state(internal)
        except BusUnavailable as exc:
            raise BinanceError(-1001, f"Internal error; unable to process your request: {exc}",
                                  503) from None  # fmt: skip
        if not recovery.current:
            return None
        book, last = LocalBook(), None
        try:
            for entry in recovery.current:
                last = _depth.decode(entry.data)
                book.apply(last)
        except (ValueError, msgspec.ValidationError):  # Redis is not trusted: no book
            return None
        assert last is not None
        bids, asks = book.sorted()
        at = Position(recovery.position.epoch, recovery.current[-1].seq)
        return at, DepthEvent("snapshot", symbol, last.u, last.u, last.u, bids, asks,
                              last.checksum, last.T)  # fmt: skip

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._budget.retune(config.binance.rest_weight_per_minute)

    def routes(self) -> list[Route]:
        out = [Route("/dapi/v1/exchangeInfo", self._empty_exchange, methods=["GET"])]
        markets: tuple[tuple[Market, str], ...] = (("spot", "/api/v3"), ("futures", "/fapi/v1"))
        for market, prefix in markets:
            for name, endpoint in (
                ("ping", self.ping), ("time", self.time), ("exchangeInfo", self.exchange_info),
                ("depth", self.depth), ("trades", self.trades), ("aggTrades", self.agg_trades),
                ("klines", self.klines), ("ticker/24hr", self.ticker),
                ("ticker/bookTicker", self.book_ticker), ("premiumIndex", self.premium_index),
            ):  # fmt: skip
                if name == "premiumIndex" and market == "spot":
                    continue
                answer = _answer(endpoint, market, name, self._budget)
                out.append(Route(f"{prefix}/{name}", answer, methods=["GET"]))
        return out

    async def _empty_exchange(self, request: Request) -> Response:
        return _json({"timezone": "UTC", "serverTime": wall_ms(), "symbols": []})

    def _symbol(self, request: Request) -> str:
        """The ``symbol`` parameter, a configured one (else -1121)."""
        symbol = request.query_params.get("symbol", "")
        if symbol not in self._config.markets:
            raise BinanceError(*INVALID_SYMBOL)
        return symbol

    async def ping(self, request: Request, market: Market) -> object:
        return {}

    async def time(self, request: Request, market: Market) -> object:
        return {"serverTime": wall_ms()}

    async def exchange_info(self, request: Request, market: Market) -> object:
        symbols = [exchange_symbol(symbol_info(s, cfg), market)
                   for s, cfg in self._config.markets.items()]  # fmt: skip
        per_minute = self._budget.per_minute
        limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                   "limit": per_minute}] if per_minute > 0 else []  # fmt: skip
        return {"timezone": "UTC", "serverTime": wall_ms(), "rateLimits": limits,
                "exchangeFilters": [], "symbols": symbols}  # fmt: skip

    async def depth(self, request: Request, market: Market) -> object:
        symbol = self._symbol(request)
        limit = read_limit(request.query_params.get("limit"), LIMITS[(market, "depth")])
        state = await self.depth_state(symbol)
        if state is None:  # no book yet: an empty one before the first event
            at, bids, asks, ts = Position("", 0), [], [], wall_ms()
        else:
            at, book = state
            if not admitted(at.epoch, wall_ms()):
                raise BinanceError(*FUTURE_EPOCH)
            bids, asks, ts = book.bids[:limit], book.asks[:limit], book.T
        out: dict[str, Any] = {"lastUpdateId": update_id(at.epoch, at.seq)}
        if market == "futures":
            out.update({"E": ts, "T": ts})
        return {**out, "bids": bids, "asks": asks}

    async def _trades(self, request: Request, market: Market, route: str) -> list[TradeItem]:
        symbol = self._symbol(request)
        kind = LIMITS[(market, route)]
        limit = read_limit(request.query_params.get("limit"), kind)
        if route == "trades" or not _windowed(request):  # the latest: no more read than that
            return _each_as((await self._api.recent_trades(symbol, limit))["data"], TradeItem)
        snap = await self._api.recent_trades(symbol, kind.most)  # all pushd keeps
        items = _each_as(snap["data"], TradeItem)
        return window(request, items, lambda t: t.ts, limit, lambda t: t.id)

    async def trades(self, request: Request, market: Market) -> object:
        out = []
        for t in await self._trades(request, market, "trades"):
            try:
                quote = format(Decimal(t.price) * Decimal(t.qty), "f")  # never 1E-8
            except ArithmeticError:  # not numbers (Redis is not trusted): left out
                continue
            item = {"id": t.id, "price": t.price, "qty": t.qty, "quoteQty": quote, "time": t.ts,
                    "isBuyerMaker": t.side == "sell"}  # fmt: skip
            if market == "spot":
                item["isBestMatch"] = True
            out.append(item)
        return out

    async def agg_trades(self, request: Request, market: Market) -> object:
        return [{"a": t.id, "p": t.price, "q": t.qty, "f": t.id, "l": t.id, "T": t.ts,
                 "m": t.side == "sell", **({"M": True} if market == "spot" else {})}
                for t in await self._trades(request, market, "aggTrades")]  # fmt: skip

    async def klines(self, request: Request, market: Market) -> object:
        symbol = self._symbol(request)
        interval = request.query_params.get("interval", "1m")
        if interval not in KLINE_INTERVALS:
            raise BinanceError(-1120, "Invalid interval.")
        limit = read_limit(request.query_params.get("limit"), LIMITS[(market, "klines")])
        most = LIMITS[(market, "klines")].most if _windowed(request) else limit
        snap = await self._api.candles(symbol, interval, most)
        rows = []
        for candle in window(request, _each_as(snap["data"], Candle), _open_time, limit):
            k = kline_fields(candle)
            rows.append([k["t"], k["o"], k["h"], k["l"], k["c"], k["v"], k["T"], k["q"], k["n"],
                         k["V"], k["Q"], "0"])  # fmt: skip
        return rows

    async def _last_pushed(self, symbol: str, stream: str, kind: type[S]) -> S | None:
        """The last event pushed on a whole-state stream (ticker, markPrice), as ``kind``: this
        process's, or the state the compute node stored (Redis). None before the first, or
        when it is not one of ``symbol`` (Redis is not trusted)."""
        channel = market_channel(stream, symbol)
        try:
            raw = (await self._backplane.snapshot(channel)).data
        except BusUnavailable as exc:
            raise BinanceError(-1001, f"Internal error: {exc}", 503) from None
        value: Any = None if raw is None else msgspec.json.decode(raw)
        try:
            found = None if value is None else _as(value, kind)
        except msgspec.ValidationError:
            return None
        return found if found is not None and found.s == symbol else None

    async def _each(
        self, request: Request, stream: str, kind: type[S], shape: Callable[[S], object]
    ) -> object:
        """One symbol's answer (``symbol`` given), else every symbol's that has one, as a list."""

        def shaped(value: S | None) -> object:
            try:
                return None if value is None else shape(value)
            except ArithmeticError:  # a stored number that is none (Redis is not trusted)
                return None

        if "symbol" not in request.query_params:
            found = [await self._last_pushed(s, stream, kind) for s in self._config.markets]
            return [answer for value in found if (answer := shaped(value)) is not None]
        answer = shaped(await self._last_pushed(self._symbol(request), stream, kind))
        if answer is None:  # nothing pushed yet (no trade, no index price), or unreadable
            raise BinanceError(*INVALID_SYMBOL)
        return answer

    async def ticker(self, request: Request, market: Market) -> object:
        def shape(t: TickerData) -> object:
            out: dict[str, Any] = {"symbol": t.s, "priceChange": t.change,
                                   "priceChangePercent": t.changePercent,
                                   "weightedAvgPrice": weighted_average(t)}  # fmt: skip
            if market == "spot":
                out["prevClosePrice"] = t.open
            out.update({"lastPrice": t.last, "lastQty": t.lastQty})
            if market == "spot":
                out.update({"bidPrice": t.bidPrice, "bidQty": t.bidQty, "askPrice": t.askPrice,
                            "askQty": t.askQty})  # fmt: skip
            out.update({"openPrice": t.open, "highPrice": t.high, "lowPrice": t.low,
                        "volume": t.volume, "quoteVolume": t.quoteVolume,
                        "openTime": t.openTime, "closeTime": t.closeTime,
                        "firstId": t.firstId if t.firstId is not None else -1,
                        "lastId": t.lastId if t.count else -1, "count": t.count})  # fmt: skip
            return out

        return await self._each(request, "ticker", TickerData, shape)

    async def premium_index(self, request: Request, market: Market) -> object:
        def shape(m: MarkPriceData) -> object:
            interest = self._config.markets[m.s].funding.interest_rate
            return {"symbol": m.s, "markPrice": m.markPrice, "indexPrice": m.indexPrice,
                    "estimatedSettlePrice": m.estimatedSettlePrice,
                    "lastFundingRate": m.fundingRate, "interestRate": interest,
                    "nextFundingTime": m.nextFundingTime, "time": m.T}  # fmt: skip

        return await self._each(request, "markPrice", MarkPriceData, shape)

    async def book_ticker(self, request: Request, market: Market) -> object:
        """The best bid and ask of one symbol (``symbol``), else of every symbol."""
        symbols = [self._symbol(request)] if "symbol" in request.query_params else list(
            self._config.markets)  # fmt: skip
        out = []
        for symbol in symbols:
            state = await self.depth_state(symbol)
            bid, ask, uid, ts = ("0", "0"), ("0", "0"), 0, wall_ms()
            if state is not None:
                at, book = state
                if not admitted(at.epoch, wall_ms()):  # one symbol's answer, or left out
                    if "symbol" in request.query_params:
                        raise BinanceError(*FUTURE_EPOCH)
                    continue
                bid = book.bids[0] if book.bids else bid
                ask = book.asks[0] if book.asks else ask
                uid, ts = update_id(at.epoch, at.seq), book.T
            item: dict[str, Any] = {"symbol": symbol, "bidPrice": bid[0], "bidQty": bid[1],
                                    "askPrice": ask[0], "askQty": ask[1]}  # fmt: skip
            if market == "futures":
                item.update({"time": ts, "lastUpdateId": uid})
            out.append(item)
        return out[0] if "symbol" in request.query_params else out


def _windowed(request: Request) -> bool:
    return any(name in request.query_params for name in WINDOW)


def _open_time(candle: Candle) -> int:
    return candle.openTime


def _answer(
    endpoint: Callable[[Request, Market], Awaitable[object]], market: Market, route: str,
    budget: RestBudget,
) -> Callable[[Request], Awaitable[Response]]:  # fmt: skip
    async def answer(request: Request) -> Response:
        address = request.client.host if request.client is not None else ""
        charge = budget.take(address, time.monotonic(), weight(market, route, request.query_params))
        if charge.retry_after is not None:
            response = _json({"code": -1003, "msg": TOO_MANY % budget.per_minute}, 429)
            response.headers["Retry-After"] = str(charge.retry_after)
        else:
            response = await _answered(endpoint, request, market)
        if charge.used is not None:
            for header in USED_WEIGHT:
                response.headers[header] = str(charge.used)
        return response

    return answer


async def _answered(
    endpoint: Callable[[Request, Market], Awaitable[object]], request: Request, market: Market
) -> Response:
    try:
        return _json(await endpoint(request, market))
    except BinanceError as exc:
        return _json({"code": exc.code, "msg": exc.msg}, exc.status)
    except ApiError as exc:  # the native endpoint's refusal
        code = -1100 if exc.status == 400 else -1000
        return _json({"code": code, "msg": exc.msg}, exc.status)


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")
