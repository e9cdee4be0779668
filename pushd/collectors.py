"""Scrape-time collectors: each reads one part of a node (the hub, ingest, the Redis bus, the
supervisor's report) when Prometheus scrapes, so the fan-out loop never touches a prometheus
object. Only the daemon imports this module (it builds the node and registers them);
``pushd.metrics`` stays a leaf.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import msgspec
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pushd import gcpolicy
from pushd.bus.lease import Leases
from pushd.bus.redis import RedisBus
from pushd.feed.intake import Intake, Refusal
from pushd.feed.listeners import PEER_DROP_REASONS, TcpPeers
from pushd.feed.poller import SnapshotPoller
from pushd.gateway.hub import Hub
from pushd.liveness import Report


class Surfaced(Protocol):
    """One listener's sockets (a ``Gateway``): by phase, and the bytes they wrote."""

    def connection_states(self) -> dict[str, int]: ...

    @property
    def bytes_sent(self) -> int: ...


class HubCollector(Collector):
    """The fan-out: connections by surface and phase, subscriptions by stream, frames and
    bytes out. ``surfaces``: the node's listeners by name (pushd's own is ``native``; the
    Binance ones ``binance_spot``, ``binance_futures``)."""

    def __init__(self, hub: Hub, surfaces: Callable[[], Mapping[str, Surfaced]]) -> None:
        self._hub = hub
        self._surfaces = surfaces

    def collect(self) -> Iterator[Metric]:
        stats = self._hub.stats()
        surfaces = self._surfaces()
        opened = GaugeMetricFamily(
            "pushd_connections_open", "Open WebSocket connections (past the handshake)",
            labels=["surface"],
        )  # fmt: skip
        by_state = GaugeMetricFamily(
            "pushd_connections", "Client sockets, by phase", labels=["state", "surface"]
        )
        sent = CounterMetricFamily(
            "pushd_bytes_sent", "Bytes written to client sockets", labels=["surface"]
        )
        for name, surface in surfaces.items():
            states = surface.connection_states()
            opened.add_metric([name], states["open"] + states["closing"])
            for state, count in states.items():
                by_state.add_metric([state, name], count)
            sent.add_metric([name], surface.bytes_sent)
        yield opened
        yield by_state
        yield sent
        yield GaugeMetricFamily("pushd_channels", "Channels with local subscribers", stats.channels)
        yield GaugeMetricFamily("pushd_subscriptions", "Local subscriptions", stats.subscriptions)
        by_stream = GaugeMetricFamily(
            "pushd_stream_subscriptions", "Local subscriptions, by stream", labels=["stream"]
        )
        for stream, count in sorted(stats.by_stream.items()):
            by_stream.add_metric([stream], count)
        yield by_stream
        yield CounterMetricFamily(
            "pushd_hub_published", "Messages that reached this node's hub", value=stats.published
        )
        yield CounterMetricFamily(
            "pushd_hub_delivered", "Frames queued to subscribers", value=stats.delivered
        )
        frames = CounterMetricFamily(
            "pushd_frames_out", "Frames queued for clients, by kind", labels=["kind"]
        )
        frames.add_metric(["event"], stats.delivered)
        frames.add_metric(["reply"], stats.replies)
        yield frames
        yield CounterMetricFamily(
            "pushd_hub_dropped",
            "Frames dropped for slow subscribers (public streams: drop, then resync)",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            "pushd_lag_resyncs",
            "Lagging subscriptions resumed with the current state or a resync notice",
            value=stats.lag_resyncs,
        )


class NodeCollector(Collector):
    """What the node is: version, role, readiness, its connection limit (for the alerts)."""

    def __init__(
        self,
        version: str,
        role: str,
        max_connections: Callable[[], int],  # a reload may change it
        not_ready: Callable[[], str | None],
    ) -> None:
        self._version = version
        self._role = role
        self._max_connections = max_connections
        self._not_ready = not_ready

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "pushd_build_info", "Always 1: the version and role", labels=["version", "role"]
        )
        info.add_metric([self._version, self._role], 1)
        yield info
        yield GaugeMetricFamily(
            "pushd_ready", "1 while /readyz says ready", value=int(self._not_ready() is None)
        )
        yield GaugeMetricFamily(
            "pushd_connection_limit", "websocket.max_connections", value=self._max_connections()
        )


class GcCollector(Collector):
    """The garbage collector's pauses and settings (``pushd.gcpolicy``), in a process that
    settled it (``pushd run``); nothing elsewhere (tests run daemons in their own process)."""

    def collect(self) -> Iterator[Metric]:
        pauses = gcpolicy.PAUSES
        if pauses is None:
            return
        histogram = HistogramMetricFamily(
            "pushd_gc_pause_seconds",
            "How long each garbage collection stopped the process, by generation (2: full)",
            labels=["generation"],
        )
        for generation in range(3):
            buckets = [
                ("+Inf" if bound == float("inf") else repr(bound), count)
                for bound, count in pauses.cumulative(generation)
            ]
            histogram.add_metric([str(generation)], buckets, pauses.sums[generation])
        yield histogram
        yield GaugeMetricFamily(
            "pushd_gc_frozen_objects", "Objects frozen at startup: never walked by a collection",
            value=gc.get_freeze_count(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pushd_gc_young_threshold", "New container objects between young collections",
            value=gc.get_threshold()[0],
        )  # fmt: skip


class IngestCollector(Collector):
    """Engine frames per source and verdict, bad input per transport, the books' freshness."""

    def __init__(
        self, intake: Intake, poller: SnapshotPoller, symbols: list[str], peers: TcpPeers,
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        self._intake = intake
        self._poller = poller
        self._symbols = symbols
        self._peers = peers
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        intake = self._intake
        frames = CounterMetricFamily(
            "pushd_ingest_frames", "Engine frames, by verdict", labels=["verdict"]
        )
        for verdict, count in sorted(intake.frames.items()):
            frames.add_metric([verdict], count)
        yield frames
        by_source = CounterMetricFamily(
            "pushd_ingest_source_frames", "Engine frames, by source and verdict",
            labels=["source", "verdict"],
        )  # fmt: skip
        for src, verdicts in sorted(intake.source_frames.items()):
            for verdict, count in sorted(verdicts.items()):
                by_source.add_metric([str(src), verdict], count)
        yield by_source
        lost = CounterMetricFamily(
            "pushd_ingest_source_lost_frames", "Engine frames lost (gaps), by source",
            labels=["source"],
        )  # fmt: skip
        for src, count in sorted(intake.source_lost.items()):
            lost.add_metric([str(src)], count)
        yield lost
        bad = CounterMetricFamily(
            "pushd_ingest_bad_frames", "Undecodable engine input, by transport",
            labels=["transport"],
        )  # fmt: skip
        for transport in ("udp", "tcp"):
            bad.add_metric([transport], intake.bad_frames[transport])
        yield bad
        events = CounterMetricFamily(
            "pushd_ingest_events", "Engine events, by type", labels=["type"]
        )
        for kind, count in sorted(intake.events.items()):
            events.add_metric([kind], count)
        yield events
        yield CounterMetricFamily(
            "pushd_ingest_lost_frames", "Engine frames lost (gaps)", value=intake.lost_frames
        )
        refused = CounterMetricFamily(
            "pushd_ingest_refused_frames",
            "Engine frames not believed (no seal, unknown source, bad MAC, outside the replay "
            "window, epoch ahead), by transport and reason",
            labels=["transport", "reason"],
        )  # fmt: skip
        for transport in ("udp", "tcp"):
            for reason in Refusal:
                refused.add_metric(
                    [transport, reason.value], intake.refused[transport, reason.value]
                )
        yield refused
        down = intake.down(self._clock())
        up = GaugeMetricFamily(
            "pushd_ingest_source_up",
            "1 while a keyed engine source's frames are accepted (a valid one within its "
            "silent_after_s)",
            labels=["source"],
        )  # fmt: skip
        for src in sorted(intake.keyed_sources()):
            up.add_metric([str(src)], int(src not in down))
        yield up
        peers = GaugeMetricFamily(
            "pushd_ingest_tcp_peers", "Engine TCP connections, by state", labels=["state"]
        )
        peers.add_metric(["waiting"], len(self._peers.waiting))
        peers.add_metric(["authenticated"], self._peers.authenticated)
        yield peers
        dropped = CounterMetricFamily(
            "pushd_ingest_tcp_peers_dropped",
            "Engine TCP connections dropped, by reason (idle, ack_stalled: once authenticated)",
            labels=["reason"],
        )  # fmt: skip
        for why in PEER_DROP_REASONS:
            dropped.add_metric([why], self._peers.dropped[why])
        yield dropped
        yield GaugeMetricFamily(
            "pushd_engine_up", "1 while the snapshot poller gets books", value=int(self._poller.up)
        )
        age = GaugeMetricFamily(
            "pushd_book_age_seconds", "Since the symbol's last book from the engine (poller lag)",
            labels=["symbol"],
        )  # fmt: skip
        for symbol in self._symbols:
            age.add_metric([symbol], min(self._poller.age(symbol), 1e9))
        yield age
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
        for link, is_up in bus.links().items():  # publish, subscribe, commands, control
            up.add_metric([link], int(is_up))
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


class SupervisorCollector(Collector):
    """Children of ``pushd run --workers`` replaced, by child and reason (``exited``, ``hung``):
    counted by the supervisor, which has no HTTP port, and exported by its compute child
    (``http.port``) from the report file the supervisor keeps. No samples in any other process,
    so no sum over every scraped process counts a replacement twice."""

    def __init__(self, report: str | None) -> None:
        self._report = Path(report) if report else None

    def collect(self) -> Iterator[Metric]:
        replaced = CounterMetricFamily(
            "pushd_children_replaced", "Children of the supervisor replaced, by child and reason",
            labels=["child", "reason"],
        )  # fmt: skip
        for child, reasons in sorted(self._read().items()):
            for reason, count in sorted(reasons.items()):
                replaced.add_metric([child, reason], count)
        yield replaced

    def _read(self) -> dict[str, dict[str, int]]:
        if self._report is None:
            return {}
        try:
            return msgspec.json.decode(self._report.read_bytes(), type=Report).replaced
        except (OSError, msgspec.DecodeError):  # the supervisor is gone, or a bug: no samples
            return {}
