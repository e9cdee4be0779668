"""Prometheus metrics, one registry per daemon (tests run several daemons in one process).

A leaf: it imports no other pushd module, so the gateway, the bus and the HTTP API may all import
it. The counters and histograms here are updated where things happen; the hot-path counts
(published, delivered, dropped) stay plain integers on the Hub and elsewhere and are read at
scrape time by the collectors of ``pushd.collectors``, which only the daemon imports.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# the flush and latency buckets: a round over 15k connections is ~1-20 ms; 10 ms is the target
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# close codes a client may send that are worth a label of their own; others count as "other"
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011})


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter(
            "pushd_connections_opened", "WebSocket connections accepted", registry=registry
        )
        self.closed_total = Counter(
            "pushd_connections_closed", "WebSocket connections ended", registry=registry
        )
        self.closed = Counter(
            "pushd_connections_closed_by_server",
            "Connections the server ended, by reason",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "pushd_handshakes_rejected", "Upgrade requests refused, by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.auth = Counter(
            "pushd_logins", "Login attempts, by result", ["result"], registry=registry
        )
        self.errors = Counter(
            "pushd_request_errors", "Error replies, by error code", ["code"], registry=registry
        )
        self.published_api = Counter(
            "pushd_api_published", "Messages accepted by the publish API", registry=registry
        )
        self.close_codes = Counter(
            "pushd_close_codes", "Close frames sent (by=server) or received (by=client), by code",
            ["by", "code"], registry=registry,
        )  # fmt: skip
        self.flush_seconds = Histogram(
            "pushd_flush_seconds", "One flusher round: every dirty connection written once",
            buckets=FAST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.publish_to_flush = Histogram(
            "pushd_publish_to_flush_seconds",
            "From the first frame queued after a round to the next round's start",
            buckets=FAST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.market_tick_late = Histogram(
            "pushd_market_tick_late_seconds", "How late the market timer's ticks ran",
            buckets=FAST_BUCKETS, registry=registry,
        )  # fmt: skip

    def close_code(self, by: str, code: int) -> None:
        known = by == "server" or code in KNOWN_CLOSE_CODES  # clients send any 1000-4999
        self.close_codes.labels(by=by, code=str(code) if known else "other").inc()


def make_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)
