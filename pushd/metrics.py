"""Prometheus metrics, one registry per daemon (tests run several daemons in one process).

Hot-path counts (published, delivered, dropped) stay plain integers on the Hub and are read at
scrape time by a collector, so the fan-out loop never touches a prometheus object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pushd.bus.lease import Leases
from pushd.bus.redis import RedisBus
from pushd.feed.intake import Intake
from pushd.feed.poller import SnapshotPoller
from pushd.gateway.hub import Hub


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


class HubCollector(Collector):
    def __init__(self, hub: Hub, open_connections: Callable[[], int]) -> None:
        self._hub = hub
        self._open_connections = open_connections

    def collect(self) -> Iterator[Metric]:
        stats = self._hub.stats()
        yield GaugeMetricFamily(
            "pushd_connections_open", "Open WebSocket connections", value=self._open_connections()
        )
        yield GaugeMetricFamily("pushd_channels", "Channels with local subscribers", stats.channels)
        yield GaugeMetricFamily("pushd_subscriptions", "Local subscriptions", stats.subscriptions)
        yield CounterMetricFamily(
            "pushd_hub_published", "Messages that reached this node's hub", value=stats.published
        )
        yield CounterMetricFamily(
            "pushd_hub_delivered", "Frames queued to subscribers", value=stats.delivered
        )
        yield CounterMetricFamily(
            "pushd_hub_dropped", "Frames dropped for slow subscribers", value=stats.dropped
        )


def make_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


class IngestCollector(Collector):
    def __init__(self, intake: Intake, poller: SnapshotPoller) -> None:
        self._intake = intake
        self._poller = poller

    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "pushd_ingest_frames", "Engine frames, by verdict", labels=["verdict"]
        )
        for verdict, count in sorted(self._intake.frames.items()):
            frames.add_metric([verdict], count)
        yield frames
        events = CounterMetricFamily(
            "pushd_ingest_events", "Engine events, by type", labels=["type"]
        )
        for kind, count in sorted(self._intake.events.items()):
            events.add_metric([kind], count)
        yield events
        yield CounterMetricFamily(
            "pushd_ingest_lost_frames", "Engine frames lost (gaps)", value=self._intake.lost_frames
        )
        yield GaugeMetricFamily(
            "pushd_engine_up", "1 while the snapshot poller gets books", value=int(self._poller.up)
        )
        yield CounterMetricFamily(
            "pushd_snapshots", "Book snapshots received", value=self._poller.snapshots
        )
        yield CounterMetricFamily(
            "pushd_snapshot_failures", "Snapshot connection failures", value=self._poller.failures
        )


class BusCollector(Collector):
    """The Redis bus: its link, its outbox, the gaps it filled or told, this node's leases."""

    def __init__(self, bus: RedisBus, leases: Leases | None) -> None:
        self._bus = bus
        self._leases = leases

    def collect(self) -> Iterator[Metric]:
        bus = self._bus
        up = GaugeMetricFamily("pushd_bus_up", "1 while Redis answers, by link", labels=["link"])
        up.add_metric(["publish"], int(bus.publisher_up))
        up.add_metric(["subscribe"], int(bus.subscriber_up))
        yield up
        yield GaugeMetricFamily("pushd_bus_outbox", "Messages waiting for Redis", bus.outbox_size)
        yield CounterMetricFamily("pushd_bus_published", "Messages Redis took", value=bus.published)
        yield CounterMetricFamily(
            "pushd_bus_dropped", "Messages dropped: outbox full while Redis was unreachable",
            value=bus.dropped,
        )  # fmt: skip
        gaps = CounterMetricFamily(
            "pushd_bus_gaps", "Jumps in a channel's seqs at this node, by outcome",
            labels=["outcome"],
        )  # fmt: skip
        gaps.add_metric(["replayed"], bus.recovered_gaps)
        gaps.add_metric(["told"], bus.resyncs)
        yield gaps
        if self._leases is not None:
            yield GaugeMetricFamily(
                "pushd_leases_held", "Leases this compute node holds (it publishes those)",
                value=len(self._leases.held),
            )  # fmt: skip
