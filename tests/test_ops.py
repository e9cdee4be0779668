"""What operators run on: the metrics a daemon exports after real traffic, and the Grafana
dashboard and Prometheus alert rules of ``ops/``, which must parse and name only series that a
running daemon (on the Redis bus, so the bus series exist) exports."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import trio
import trio_websocket
import yaml
from conftest import Running, make_config, open_client, order, start_daemon, subscribed
from redis_servers import RedisServer
from scrape import Scrape

from ingest.transport import UdpSender

OPS = Path(__file__).resolve().parent.parent / "ops"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
TARGET_LABELS = {"instance", "job"}  # labels Prometheus adds to every scraped series
# what the operations issue asks the daemon to export, by family
REQUIRED = {
    "pushd_connections",  # by state
    "pushd_stream_subscriptions",
    "pushd_frames_out", "pushd_bytes_sent",
    "pushd_hub_dropped", "pushd_lag_resyncs", "pushd_connections_closed_by_server",
    "pushd_close_codes", "pushd_logins",
    "pushd_ingest_source_frames", "pushd_ingest_source_lost_frames", "pushd_ingest_bad_frames",
    "pushd_book_age_seconds", "pushd_market_tick_late_seconds",
    "pushd_flush_seconds", "pushd_publish_to_flush_seconds",
    "pushd_bus_up", "pushd_bus_outbox", "pushd_bus_dropped", "pushd_leases_held",
    "pushd_ready", "pushd_build_info",
}  # fmt: skip


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def daemon(nursery: trio.Nursery, redis: RedisServer) -> AsyncIterator[Running]:
    config = make_config(bus={"kind": "redis", "redis": {"url": redis.url}})
    yield await start_daemon(nursery, config)


async def scrape(running: Running) -> Scrape:
    async with httpx.AsyncClient() as http:
        return Scrape((await http.get(f"{running.http_url}/metrics")).text)


async def traffic(running: Running) -> None:
    """A login that fails and one that works, a subscription with events, engine frames and
    garbage on UDP, a client close, a server close, a refused upgrade."""
    async with open_client(running.ws_url) as client:
        assert (await client.call({"op": "auth", "token": "forged"}))["code"]
        assert (await client.call({"op": "auth", "token": running.token("1001")}))["result"]
        reply = await client.call({"op": "subscribe", "channel": "BTCUSDT@trades", "id": 1})
        assert subscribed(reply, "BTCUSDT@trades")
        assert subscribed(await client.call({"op": "subscribe", "channel": "@order"}), "@order")
        await running.publish("trades_BTCUSDT", [{"p": "1"}])
        assert (await client.recv())["event"] == "BTCUSDT@trades"
        assert (await scrape(running)).value("pushd_stream_subscriptions", stream="trades") == 1
        sender = UdpSender("127.0.0.1", running.ports.ingest_udp, src=7)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            await junk.sendto(b"\x00 not a frame", ("127.0.0.1", running.ports.ingest_udp))
        await sender.send([order("1001", 1)])  # after the garbage: read after it, in order
        sender.close()
        assert (await client.recv())["event"] == "@order"  # so both are counted by now
    async with open_client(running.ws_url) as client:  # too big: the server closes with 1009
        await client.send({"op": "ping", "pad": "x" * 5000})
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.reason.code == 1009
    async with httpx.AsyncClient() as http:
        port = running.ports.websocket
        assert (await http.get(f"http://127.0.0.1:{port}/nowhere")).status_code in (400, 404)


async def test_metrics_count_what_happened(daemon: Running) -> None:
    await traffic(daemon)
    metrics = await scrape(daemon)
    assert metrics.value("pushd_ingest_source_frames_total", source="7", verdict="restart") == 1
    assert metrics.value("pushd_ingest_bad_frames_total", transport="udp") == 1
    assert metrics.value("pushd_logins_total", result="failed") == 1
    assert metrics.value("pushd_logins_total", result="ok") == 1
    assert metrics.value("pushd_close_codes_total", by="client", code="1000") >= 1
    assert metrics.value("pushd_close_codes_total", by="server", code="1009") == 1
    assert metrics.value("pushd_connections_closed_by_server_total",
                         reason="message_too_big") == 1  # fmt: skip
    assert metrics.value("pushd_frames_out_total", kind="event") >= 1
    assert metrics.value("pushd_frames_out_total", kind="reply") >= 3
    assert metrics.value("pushd_bytes_sent_total") > 100
    assert metrics.value("pushd_publish_to_flush_seconds_count") >= 1
    assert metrics.value("pushd_flush_seconds_count") >= 1
    assert metrics.value("pushd_market_tick_late_seconds_count") >= 1
    assert metrics.value("pushd_ready") == 1
    assert metrics.value("pushd_bus_up", link="publish") == 1
    assert metrics.value("pushd_book_age_seconds", symbol="BTCUSDT") > 0
    states = {s.labels["state"] for s in metrics.families["pushd_connections"].samples}
    assert states == {"handshake", "open", "closing"}
    missing = REQUIRED - set(metrics.families)
    assert not missing, f"not exported: {sorted(missing)}"


def selectors(expr: str) -> Iterator[Any]:
    """Every vector selector of a PromQL expression (parsing raises on a syntax error)."""
    stack = [promql_parser.parse(expr)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            yield node
            continue
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                stack.append(child)
        stack.extend(getattr(node, "args", None) or ())


def check_expression(expr: str, metrics: Scrape, where: str) -> None:
    for selector in selectors(expr):
        name = selector.name
        assert name, f"{where}: a selector without a metric name: {expr}"
        if name in PROMETHEUS_OWN:
            continue
        assert name in metrics.labels, f"{where}: {name} is not exported by pushd"
        used = {m.name for m in selector.matchers.matchers} - TARGET_LABELS
        known = metrics.labels[name]
        assert used <= known or not known, f"{where}: {name} has no label {used - known}"


def grafana_expr(expr: str) -> str:
    """A panel's query as Prometheus gets it from Grafana (template variables filled in)."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


async def test_dashboard_and_alerts_name_only_exported_series(daemon: Running) -> None:
    await traffic(daemon)
    metrics = await scrape(daemon)
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 10
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("page", "warning", "info")
        assert rule["annotations"]["summary"]
        check_expression(rule["expr"], metrics, rule["alert"])
    dashboard = json.loads((OPS / "grafana" / "pushd-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_expression(grafana_expr(target["expr"]), metrics, panel["title"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<series>, <label>)
            series = variable["query"].removeprefix("label_values(").split(",")[0]
            assert series in metrics.labels, variable["name"]
    scrape_jobs = yaml.safe_load((OPS / "prometheus" / "scrape.yml").read_text())
    assert [job["job_name"] for job in scrape_jobs] == ["pushd"]  # what the alerts select


def test_a_broken_expression_or_unknown_series_is_caught() -> None:
    """The checks above can fail: a typo in a series name or in PromQL is an error."""
    metrics = Scrape("# TYPE pushd_ready gauge\npushd_ready 1\n")
    check_expression("pushd_ready == 0", metrics, "ok")
    with pytest.raises(AssertionError, match="not exported"):
        check_expression("pushd_redy == 0", metrics, "typo")
    with pytest.raises(ValueError):
        check_expression("sum(pushd_ready", metrics, "syntax")
