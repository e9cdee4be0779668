"""The HTTP side: publish API for the exchange's backends, operations endpoints, metrics.

Starlette routes, served by hypercorn on Trio (``serve_http``). Endpoints, all JSON:

- ``POST /v1/publish``             ``{"channel": internal, "data": any}`` (bearer token)
- ``POST /v1/publish/batch``       ``{"messages": [{"channel":..., "data":...}, ...]}`` (bearer)
- ``POST /v1/users/{uid}/disconnect``  close every connection of that uid with 4003 (bearer)
- ``GET  /v1/stats``               connections, channels, subscriptions, counters (bearer)
- ``GET  /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus text format)
- ``GET  /`` the demo market page, ``GET /v1/info`` its WebSocket port and symbols
- ``GET  /v1/depth``, ``/v1/trades``, ``/v1/klines``, ``/v1/ticker``, ``/v1/markPrice``: what a
  page loads before it subscribes, public: ``{"channel":..., "seq": N, "epoch": E, "stale":
  bool, "data": ...}`` where ``data`` is exactly what the channel's events up to seq ``N`` say
  (the next event is ``N + 1``), and ``stale`` is true while the book may be behind the engine.
  Read from the node's backplane (``pushd.bus.backplane``), the one source of current state:
  a state stream's snapshot is the first event a fresh subscriber of this node gets.
- ``GET  /openapi.json``: this API as an OpenAPI 3.1 document (request bodies from the Structs).

Cluster-wide answers (disconnect, stats) come from the backplane too: this module never asks
which bus runs. What the backplane reads from Redis answers 503 while Redis is unreachable.

Backends publish only what they own: ``notice`` and ``user_<uid>_<stream>``. The market
channels are computed here (their seqs and depth update ids are a chain a backend must not
break), so publishing to them is refused with 403.

(Over 400 lines: the endpoints, the OpenAPI document that says what they accept, and the
hypercorn shell that serves them; the document is kept beside the endpoints it describes.)
"""

from __future__ import annotations

import functools
import hmac
import inspect
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pushd.binance.rest import BinanceRest
from pushd.bus.backplane import Backplane
from pushd.bus.model import Outgoing, Position, Snapshot
from pushd.channels import (
    KLINE_INTERVALS,
    NOTICE,
    PRIVATE_STREAMS,
    UID_PATTERN,
    market_channel,
    parse_internal,
)
from pushd.config import Config
from pushd.errors import ApiError, BusUnavailable
from pushd.http.owned import backend_message
from pushd.logs import stdlib_logger
from pushd.market.trades import RECENT_TRADES, TradeBatch
from pushd.metrics import GatewayMetrics
from pushd.tls import server_context

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_DEPTH_LEVELS = 5000  # GET /v1/depth?limit=
MAX_KLINES = 1000  # GET /v1/klines?limit=
STATIC = Path(__file__).parent.parent / "static"  # the page, its client module, the chart library
PAGE = STATIC / "index.html"
T = TypeVar("T")


class PublishItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    channel: Annotated[str, msgspec.Meta(max_length=128)]
    data: msgspec.Raw


class PublishBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    messages: list[PublishItem]


class HttpApi:
    """State the endpoints share. ``not_ready``: why this node should get no new clients now
    (None: ready); ``demo_login``: a demo user's token for the page (``pushd demo`` only)."""

    def __init__(
        self,
        config: Config,
        backplane: Backplane,
        registry: CollectorRegistry,
        metrics: GatewayMetrics,
        not_ready: Callable[[], str | None],
        demo_login: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._registry = registry
        self._metrics = metrics
        self._symbols = frozenset(config.markets)
        self._max_data = config.limits.publish_max_bytes
        self._market_publish = config.http.allow_market_publish
        self._openapi = msgspec.json.encode(openapi_document(config))
        self.tls_context = server_context(config.http.tls, "http")
        self.not_ready = not_ready
        self.websocket_port = config.websocket.port  # the bound one, once the gateway listens
        self.demo_login = demo_login
        self.binance = BinanceRest(config, self, backplane)
        self.app = Starlette(
            routes=[
                Route("/v1/publish", self._guard(self.publish), methods=["POST"]),
                Route("/v1/publish/batch", self._guard(self.publish_batch), methods=["POST"]),
                Route("/v1/users/{uid}/disconnect", self._guard(self.disconnect), methods=["POST"]),
                Route("/v1/stats", self._guard(self.stats), methods=["GET"]),
                Route("/", self.page, methods=["GET"]),
                Route("/demo/login", self.demo, methods=["GET"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
                Route("/v1/info", self._public(self.info), methods=["GET"]),
                Route("/v1/depth", self._public(self.depth), methods=["GET"]),
                Route("/v1/trades", self._public(self.trades), methods=["GET"]),
                Route("/v1/klines", self._public(self.klines), methods=["GET"]),
                Route("/v1/ticker", self._public(self.ticker), methods=["GET"]),
                Route("/v1/markPrice", self._public(self.mark_price), methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                *self.binance.routes(),  # the Binance surfaces' REST (docs/binance.md)
            ]
        )

    def _guard(
        self, endpoint: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Bearer-token check and error mapping for the backend-facing endpoints."""

        async def guarded(request: Request) -> Response:
            expected = self._config.http.publish_token
            try:
                if not expected:
                    raise ApiError(503, "publish API disabled: set http.publish_token")
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.encode(), expected.encode()
                ):
                    raise ApiError(401, "missing or wrong bearer token")
                result = await endpoint(request)
            except ApiError as exc:
                return _json({"error": exc.msg}, exc.status)
            return _json(result)

        return guarded

    @staticmethod
    def _public(
        endpoint: Callable[[Request], Awaitable[object]] | Callable[[Request], object],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Error mapping for the public snapshot endpoints (no token)."""

        async def public(request: Request) -> Response:
            try:
                result = endpoint(request)
                if inspect.isawaitable(result):
                    result = await result
                return _json(result)
            except ApiError as exc:
                return _json({"error": exc.msg}, exc.status)

        return public

    def _symbol(self, request: Request) -> str:
        symbol = request.query_params.get("symbol", "")
        if symbol not in self._symbols:
            raise ApiError(400, f"unknown symbol {symbol!r}")
        return symbol

    @staticmethod
    def _limit(request: Request, default: int, most: int) -> int:
        text = request.query_params.get("limit", str(default))
        # ASCII digits only: str.isdigit() is true of "²", which int() refuses
        if not (text.isascii() and text.isdigit() and len(text) <= 9 and 1 <= int(text) <= most):
            raise ApiError(400, f"limit must be 1 to {most}")
        return int(text)

    def _answer(self, internal: str, at: Position, data: object, stale: bool) -> dict[str, Any]:
        return {
            "channel": parse_internal(internal, self._symbols).protocol,
            "seq": at.seq,
            "epoch": at.epoch,
            "stale": stale,
            "data": data,
        }

    async def _snapshot(self, internal: str) -> Snapshot:
        """A state stream's state from the one source (``Backplane.snapshot``): what a fresh
        subscriber of this node starts from, exact at its position."""
        try:
            return await self._backplane.snapshot(internal)
        except BusUnavailable as exc:
            raise ApiError(503, f"Redis unreachable: {exc}") from None

    async def _state(self, internal: str) -> tuple[Position, Any]:
        """``_snapshot``, its state decoded."""
        current = await self._snapshot(internal)
        data = current.data
        return current.position, _stored_value(data, dict[str, Any]) if data is not None else None

    async def page(self, request: Request) -> Response:
        """The market page (its module and chart library are under ``/static``)."""
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def demo(self, request: Request) -> Response:
        """A fresh demo-user token for the page's login button: ``pushd demo`` only (404 on a
        daemon, which has no demo user)."""
        if self.demo_login is None:
            return _json({"error": "no demo login here"}, 404)
        return _json(self.demo_login())

    def info(self, request: Request) -> object:
        """What the page needs to connect: the WebSocket port and the symbols."""
        return {"websocket_port": self.websocket_port, "symbols": sorted(self._symbols)}

    async def depth(self, request: Request) -> object:
        symbol = self._symbol(request)
        limit = self._limit(request, 100, MAX_DEPTH_LEVELS)
        channel = market_channel("depth", symbol)
        current = await self._snapshot(channel)
        cut = _top_of_book(current.data, limit) if current.data is not None else None
        if cut is None:  # none yet, or not a book (Redis is not trusted)
            return self._answer(channel, current.position, None, self._backplane.book_stale(symbol))
        book, stale = cut
        return self._answer(channel, current.position, book, stale)

    async def trades(self, request: Request) -> object:
        return await self.recent_trades(
            self._symbol(request), self._limit(request, 100, RECENT_TRADES)
        )

    async def recent_trades(self, symbol: str, limit: int) -> dict[str, Any]:
        """The last ``limit`` trades of a configured ``symbol`` pushed, as ``GET /v1/trades``
        answers them (also the Binance surfaces', which read their own parameters)."""
        channel = market_channel("trades", symbol)
        try:
            at, batches = await self._backplane.recent(channel, limit)
        except BusUnavailable as exc:
            raise ApiError(503, f"Redis unreachable: {exc}") from None
        decoded = (_stored_value(b, TradeBatch) for b in batches)
        items = [t for batch in decoded if batch is not None for t in batch.trades]
        return self._answer(channel, at, items[-limit:], self._backplane.book_stale(symbol))

    async def klines(self, request: Request) -> object:
        symbol = self._symbol(request)
        interval = request.query_params.get("interval", "1m")
        if interval not in KLINE_INTERVALS:
            raise ApiError(400, f"interval must be one of {', '.join(KLINE_INTERVALS)}")
        return await self.candles(symbol, interval, self._limit(request, 500, MAX_KLINES))

    async def candles(self, symbol: str, interval: str, limit: int) -> dict[str, Any]:
        """The last ``limit`` candles of a configured ``symbol`` and ``interval``, as ``GET
        /v1/klines`` answers them (also the Binance surfaces')."""
        channel = market_channel("kline", symbol, interval)
        at, open_candle = await self._state(channel)
        try:  # the closed candles, then the open one as a new subscriber gets it
            archived = await self._backplane.archived(channel, limit)
        except BusUnavailable as exc:
            raise ApiError(503, f"Redis unreachable: {exc}") from None
        candles: list[Any] = [c for raw in archived if (c := _stored_value(raw, dict[str, Any]))]
        if open_candle is not None and not open_candle.get("closed", False):
            candles.append(open_candle)
        return self._answer(channel, at, candles[-limit:], self._backplane.book_stale(symbol))

    async def ticker(self, request: Request) -> object:
        return await self._whole_state(request, "ticker")

    async def mark_price(self, request: Request) -> object:
        return await self._whole_state(request, "markPrice")

    async def _whole_state(self, request: Request, stream: str) -> object:
        symbol = self._symbol(request)
        channel = market_channel(stream, symbol)
        at, data = await self._state(channel)
        return self._answer(channel, at, data, self._backplane.book_stale(symbol))

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
        return body

    def _check(self, item: PublishItem) -> Outgoing:
        return backend_message(
            item.channel, item.data, self._symbols, self._max_data,
            market_publish=self._market_publish,
        )  # fmt: skip

    async def publish(self, request: Request) -> dict[str, object]:
        item = _decode(await self._body(request), PublishItem)
        [at] = await self._publish([self._check(item)])
        self._metrics.published_api.inc()
        return {"result": True, "seq": at.seq, "epoch": at.epoch}

    async def publish_batch(self, request: Request) -> dict[str, object]:
        batch = _decode(await self._body(request), PublishBatch)
        if len(batch.messages) > self._config.http.max_batch:
            raise ApiError(413, f"batch over {self._config.http.max_batch} messages")
        # every message is checked before any is published: all valid, or none published
        items = [self._check(item) for item in batch.messages]
        positions = await self._publish(items)
        self._metrics.published_api.inc(len(items))
        return {
            "result": True,
            "seqs": [at.seq for at in positions],
            "epochs": [at.epoch for at in positions],
        }

    async def _publish(self, items: list[Outgoing]) -> list[Position]:
        try:
            return await self._backplane.bus.publish_confirmed(items)
        except BusUnavailable as exc:
            raise ApiError(503, f"not published: {exc}") from None

    async def disconnect(self, request: Request) -> dict[str, object]:
        uid = request.path_params["uid"]
        if not UID_PATTERN.fullmatch(uid):
            raise ApiError(400, "invalid uid")
        try:
            return {"result": True, **await self._backplane.kick(uid)}
        except BusUnavailable as exc:
            raise ApiError(503, f"Redis unreachable: {exc}") from None

    def reconfigure(self, config: Config) -> None:
        """A reload: the publish token, batch size and limits of requests from now on."""
        self._config = config
        self._max_data = config.limits.publish_max_bytes
        self.binance.reconfigure(config)
        self._openapi = msgspec.json.encode(openapi_document(config))

    async def stats(self, request: Request) -> dict[str, object]:
        try:
            return await self._backplane.stats()
        except BusUnavailable as exc:
            raise ApiError(503, f"Redis unreachable: {exc}") from None

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        reason = self.not_ready()
        if reason is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": reason}, 503)

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)


def openapi_document(config: Config) -> dict[str, Any]:
    """The API as OpenAPI 3.1: request bodies are the msgspec Structs' own JSON Schemas, with
    what this node accepts (its symbols, the channels backends own, its limits) filled in."""
    (item, batch), components = msgspec.json.schema_components(
        [PublishItem, PublishBatch], ref_template="#/components/schemas/{name}"
    )
    if not config.http.allow_market_publish:
        uid = UID_PATTERN.pattern
        components["PublishItem"]["properties"]["channel"]["pattern"] = (
            f"^({NOTICE}|user_{uid}_({'|'.join(PRIVATE_STREAMS)}))$"
        )
    components["PublishBatch"]["properties"]["messages"]["maxItems"] = config.http.max_batch
    error = {
        "description": "refused",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                }
            }
        },
    }
    ok = {"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}}
    guarded = {"401": error, "503": error}

    def body(schema: object) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    def query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": required, "schema": schema}

    symbol = query("symbol", {"type": "string", "enum": sorted(config.markets)}, required=True)

    def limit(most: int) -> dict[str, Any]:
        return query("limit", {"type": "integer", "minimum": 1, "maximum": most})

    snapshot = {"responses": {"200": ok, "400": error}}
    paths: dict[str, Any] = {
        "/v1/publish": {"post": {"security": [{"bearer": []}], "requestBody": body(item),
                                 "responses": {"200": ok, "400": error, "403": error,
                                               "413": error, **guarded}}},
        "/v1/publish/batch": {"post": {"security": [{"bearer": []}], "requestBody": body(batch),
                                       "responses": {"200": ok, "400": error, "403": error,
                                                     "413": error, **guarded}}},
        "/v1/users/{uid}/disconnect": {"post": {
            "security": [{"bearer": []}],
            "parameters": [{"name": "uid", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": f"^{UID_PATTERN.pattern}$"}}],
            "responses": {"200": ok, "400": error, **guarded}}},
        "/v1/stats": {"get": {"security": [{"bearer": []}], "responses": {"200": ok, **guarded}}},
        "/v1/info": {"get": {"responses": {"200": ok}}},
        "/v1/depth": {"get": {"parameters": [symbol, limit(MAX_DEPTH_LEVELS)], **snapshot}},
        "/v1/trades": {"get": {"parameters": [symbol, limit(RECENT_TRADES)], **snapshot}},
        "/v1/klines": {"get": {"parameters": [
            symbol, limit(MAX_KLINES),
            query("interval", {"type": "string", "enum": list(KLINE_INTERVALS)})],
            **snapshot}},
        "/v1/ticker": {"get": {"parameters": [symbol], **snapshot}},
        "/v1/markPrice": {"get": {"parameters": [symbol], **snapshot}},
        "/healthz": {"get": {"responses": {"200": ok}}},
        "/readyz": {"get": {"responses": {"200": ok, "503": ok}}},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "pushd HTTP API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def _decode(body: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError:
        raise ApiError(400, "malformed JSON") from None
    except RecursionError:  # msgspec's answer to JSON nested past its depth limit
        raise ApiError(400, "JSON nested too deep") from None


def _top_of_book(raw: msgspec.Raw, limit: int) -> tuple[dict[str, Any], bool] | None:
    """A depth state cut to its best ``limit`` levels a side, and whether it says it is stale;
    None where it is not a book. Its levels stay undecoded: a book of thousands of levels is
    scanned, not built as a Python list per level (10x the cost of the answer)."""
    book = _stored_value(raw, dict[str, msgspec.Raw])
    if book is None or "bids" not in book or "asks" not in book:
        return None
    bids = _stored_value(book["bids"], list[msgspec.Raw])
    asks = _stored_value(book["asks"], list[msgspec.Raw])
    if bids is None or asks is None:
        return None
    stale = "stale" in book and bool(_stored_value(book["stale"], Any))
    return {**book, "bids": bids[:limit], "asks": asks[:limit]}, stale


def _stored_value(raw: bytes | msgspec.Raw, kind: Any) -> Any:
    """A value Redis handed back, decoded as ``kind``, or None where it is not one."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, RecursionError):
        return None


class _Hypercorn(HypercornConfig):
    """Hypercorn's config with the daemon's TLS context: a reload re-reads the certificate
    into it, and new connections get the new one."""

    tls_context: ssl.SSLContext | None = None

    @property
    def ssl_enabled(self) -> bool:
        return self.tls_context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.tls_context


async def serve_http(
    app: Starlette,
    host: str,
    port: int,
    shutdown: trio.Event,
    tls_context: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set (https with a context); reports the port."""
    config = _Hypercorn()
    config.bind = [f"{host}:{port}"]
    config.tls_context = tls_context
    config.accesslog = None
    # any 5xx is a bug: hypercorn logs the app's exception ("Error in ASGI Framework") here
    config.errorlog = stdlib_logger("pushd.http")
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, config, shutdown_trigger=shutdown.wait),  # type: ignore[arg-type]  # Starlette is ASGI; hypercorn's Framework union misses it
        )
        task_status.started(int(urls[0].rsplit(":", 1)[1]))
