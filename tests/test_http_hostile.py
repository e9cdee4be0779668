"""No input gets a 500 from any HTTP route, and a 5xx that does happen is logged with its
traceback (issue 18). Real ``pushd run`` processes on both buses; on the Redis one the stored
states, history and archive that REST reads back are planted with what a broken or hostile
process with access to Redis could leave there."""

from __future__ import annotations

import subprocess
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
import structlog
import trio
from conftest import PUBLISH_TOKEN
from hypothesis import example, given
from hypothesis import strategies as st
from redis_servers import REDIS_CLI, RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_fuzz import FUZZ, Daemon, Surface, run_daemon

from pushd.bus.store import Keys
from pushd.http.api import serve_http

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}", "content-type": "application/json"}
GET_ROUTES = ["/v1/depth", "/v1/trades", "/v1/klines", "/v1/ticker", "/v1/markPrice",
              "/v1/info", "/healthz", "/readyz", "/openapi.json", "/demo/login"]  # fmt: skip
PARAMS = ["symbol", "limit", "interval"]
# what a query value may be: valid ones, digits int() refuses ("²" passes str.isdigit()),
# numbers too long for int(), any text, any bytes (percent-encoded, not UTF-8 too)
VALUES = st.one_of(
    st.sampled_from(["BTCUSDT", "ETHUSDT", "1", "100", "1000", "5000", "1m", "1M", "0", "-1"]),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.just("9" * 5000),
    st.text(max_size=20),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
QUERIES = st.lists(st.tuples(st.sampled_from([*PARAMS, "x"]), VALUES), max_size=4)


def query_string(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={urllib.parse.quote(v.encode('latin-1', 'replace'))}" for k, v in pairs)


def plant_rest_states(redis: RedisServer) -> None:
    """What REST reads back on a Redis node, made wrong in every way it could be: data that is
    not UTF-8, not JSON, JSON of the wrong shape; history entries without their fields."""

    def cli(*args: bytes | str) -> None:
        command = [REDIS_CLI, "-p", str(redis.port), *args]
        subprocess.run(command, check=True, capture_output=True)

    wrong = [b'"\xff\xfe"', b"{not json", b"[1,2]", b'{"bids":7,"asks":"x"}', b"1", b"[" * 3000]
    for n, symbol in enumerate(["BTCUSDT", "ETHUSDT", "SOLUSDT"]):
        state = wrong[n % len(wrong)]
        for stream in ("depth", "ticker", "markPrice", "kline_1m", "kline_1h"):
            keys = Keys("pushd", f"{stream}_{symbol}")
            cli("HSET", keys.meta, "e", "planted0", "s", "5", "st", state, "ss", "5")
        archive = Keys("pushd", f"kline_1m_{symbol}").archive
        cli("RPUSH", archive, *wrong, b'{"s":"BTCUSDT","closed":true}')
        trades = Keys("pushd", f"trades_{symbol}")
        cli("HSET", trades.meta, "e", "planted0", "s", "9")
        for seq, data in enumerate(wrong, 1):
            cli("XADD", trades.hist, "*", "s", str(seq), "d", data)
        cli("XADD", trades.hist, "*", "only", "this")
        cli("XADD", trades.hist, "*", "s", "not a number", "d", "[]")


@pytest.fixture(scope="module")
def memory_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from run_daemon(tmp_path_factory.mktemp("http-memory"))


@pytest.fixture(scope="module")
def redis_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A node on the Redis bus (its REST reads Redis, not its own book) over planted states."""
    with RedisServer() as redis:
        plant_rest_states(redis)
        extra = f"[bus]\nkind = 'redis'\n[bus.redis]\nurl = '{redis.url}'\n"
        yield from run_daemon(tmp_path_factory.mktemp("http-redis"), extra)


@pytest.fixture(params=["memory", "redis"])
def node(request: pytest.FixtureRequest) -> Daemon:
    chosen: Daemon = request.getfixturevalue(f"{request.param}_node")
    return chosen


def no_server_errors(daemon: Daemon) -> None:
    log = daemon.log.read_text()
    assert "Error in ASGI Framework" not in log, log[-4000:]


def test_no_query_gets_a_server_error(node: Daemon) -> None:
    """Every GET route, every query: an answer below 500 (400 for what it refuses)."""
    with Surface(node, "http_query") as surface, httpx.Client() as http:

        @FUZZ
        @given(route=st.sampled_from(GET_ROUTES), pairs=QUERIES)
        @example(route="/v1/depth", pairs=[("symbol", "BTCUSDT"), ("limit", "²")])
        @example(route="/v1/trades", pairs=[("symbol", "BTCUSDT"), ("limit", "9" * 5000)])
        @example(route="/v1/klines", pairs=[("symbol", "BTCUSDT"), ("limit", "①")])
        def one(route: str, pairs: list[tuple[str, str]]) -> None:
            surface.case()
            url = f"http://127.0.0.1:{node.http}{route}?{query_string(pairs)}"
            status = http.get(url).status_code
            assert status < 500, (url, status)

        one()
        for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):  # each planted state, every route
            for route in GET_ROUTES[:5]:
                for params in ({}, {"limit": "1"}, {"interval": "1h"}):
                    url = f"http://127.0.0.1:{node.http}{route}"
                    r = http.get(url, params={"symbol": symbol, **params})
                    assert r.status_code in (200, 400), (route, symbol, r.status_code, r.text)
    no_server_errors(node)


def test_publish_bodies_nested_too_deep_are_refused(node: Daemon) -> None:
    """msgspec answers JSON nested past its depth limit with RecursionError, not DecodeError."""
    deep = b"[" * 3000 + b"]" * 3000
    bodies = {
        "/v1/publish": [b'{"channel":"notice","data":' + deep + b"}", deep],
        "/v1/publish/batch": [b'{"messages":[{"channel":"notice","data":' + deep + b"}]}", deep],
    }
    with httpx.Client() as http:
        for path, sent in bodies.items():
            for body in sent:
                r = http.post(f"http://127.0.0.1:{node.http}{path}", content=body, headers=AUTH)
                assert r.status_code == 400, (path, r.status_code, r.text)
    no_server_errors(node)


async def test_a_server_error_is_logged_with_its_traceback() -> None:
    """The daemon's HTTP server (``serve_http``, as the daemon runs it) logs what an endpoint
    raised, with the traceback, to the daemon's log: forced here with an endpoint that fails."""

    async def broken(request: Request) -> Response:
        raise ZeroDivisionError("a bug in an endpoint")

    app = Starlette(routes=[Route("/broken", broken)])
    stop = trio.Event()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, app, "127.0.0.1", 0, stop)
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://127.0.0.1:{port}/broken")
            assert r.status_code == 500
            stop.set()  # the nursery ends once hypercorn finished the request, and logged it
    [logged] = [entry for entry in logs if entry["event"] == "Error in ASGI Framework"]
    assert logged["log_level"] == "error"
    kind, error, _ = logged["exc_info"]
    assert kind is ZeroDivisionError and str(error) == "a bug in an endpoint"
