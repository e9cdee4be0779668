"""The daemon: one Trio nursery tree that owns every service, and its graceful shutdown.

::

    Daemon.serve
    ├── Gateway.serve          WebSocket listener, flusher, one task per connection
    ├── serve_http             hypercorn: publish API, health, metrics
    ├── serve_udp, serve_tcp   engine events -> Intake -> EngineRouter (private) / Markets
    ├── SnapshotPoller.run     engine books -> Markets (depth diffs, published at once)
    └── Markets.run            the timer of the market streams (trades, ticker, kline, mark)

Shutdown (``stop()``, SIGTERM or SIGINT): readiness goes false, the gateway stops accepting and
closes every client with 1001 (grace period ``SHUTDOWN_GRACE_S``), then the HTTP server stops and
the tree is cancelled.
"""

from __future__ import annotations

import secrets
import signal

import msgspec
import structlog
import trio

from ingest import wire
from pushd.auth import Verifier, make_verifier
from pushd.bus import MemoryBus, Publisher
from pushd.config import AuthConfig, Config
from pushd.gateway import Gateway
from pushd.http_api import HttpApi, serve_http
from pushd.hub import Hub
from pushd.intake import Intake
from pushd.listeners import serve_tcp, serve_udp
from pushd.markets import Markets
from pushd.metrics import GatewayMetrics, HubCollector, IngestCollector, make_registry
from pushd.poller import SnapshotPoller
from pushd.routing import EngineRouter

SHUTDOWN_GRACE_S = 5.0

log = structlog.get_logger("pushd.daemon")


class Ports(msgspec.Struct, frozen=True):
    websocket: int
    http: int
    ingest_udp: int = 0  # 0: that listener is off
    ingest_tcp: int = 0


def with_hmac_secret(config: Config) -> Config:
    """The config, with a random HMAC secret if hmac auth is on and none is set."""
    if config.auth.kind != "hmac" or config.auth.hmac.secret:
        return config
    log.warning("auth.hmac.secret not set: using a random one, tokens from other processes fail")
    hmac_cfg = msgspec.structs.replace(config.auth.hmac, secret=secrets.token_urlsafe(32))
    auth: AuthConfig = msgspec.structs.replace(config.auth, hmac=hmac_cfg)
    return msgspec.structs.replace(config, auth=auth)


class Daemon:
    def __init__(self, config: Config, verifier: Verifier | None = None) -> None:
        config = with_hmac_secret(config)
        self.config = config
        self.registry = make_registry()
        self.metrics = GatewayMetrics(self.registry)
        self.hub = Hub()
        self.bus = MemoryBus(self.hub)
        self.publisher = Publisher(self.bus)
        self.verifier = verifier if verifier is not None else make_verifier(config.auth)
        self.gateway = Gateway(config, self.hub, self.verifier, self.metrics)
        self.registry.register(HubCollector(self.hub, lambda: len(self.gateway.connections)))
        self.poller = SnapshotPoller(config.engine, config.markets, self._on_book)
        self.markets = Markets(dict(config.markets), self.publisher, self.poller.refresh)
        self.api = HttpApi(
            config, self.publisher, self.gateway, self.registry, self.metrics, self.markets
        )
        self.hub.current = self.markets.current
        self.intake = Intake(EngineRouter(self.publisher, self.markets), frozenset(config.markets))
        self.registry.register(IngestCollector(self.intake, self.poller))
        self._stop = trio.Event()
        self.stopped = trio.Event()

    def _on_book(self, snapshot: wire.BookSnapshot) -> None:
        self.markets.book(snapshot)

    def stop(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns when it is done."""
        self._stop.set()

    async def serve(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        http_stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(self._stop_on_signal)
                ws_port = await nursery.start(self.gateway.serve)
                self.api.websocket_port = ws_port
                http_cfg = self.config.http
                http_port = await nursery.start(
                    serve_http, self.api, http_cfg.host, http_cfg.port, http_stop
                )
                ingest = self.config.ingest
                udp_port = tcp_port = 0
                if ingest.udp_enabled:
                    udp_port = await nursery.start(serve_udp, ingest, self.intake)
                if ingest.tcp_enabled:
                    tcp_port = await nursery.start(serve_tcp, ingest, self.intake)
                if self.config.engine.snapshot_enabled:
                    nursery.start_soon(self.poller.run)
                nursery.start_soon(self.markets.run)
                self.api.ready = True
                ports = Ports(ws_port, http_port, udp_port, tcp_port)
                log.info("pushd ready", **msgspec.structs.asdict(ports))
                task_status.started(ports)
                await self._stop.wait()
                log.info("shutting down", connections=len(self.gateway.connections))
                self.api.ready = False
                await self.gateway.shutdown(SHUTDOWN_GRACE_S)
                http_stop.set()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.verifier.aclose()
            self.stopped.set()
        log.info("stopped")

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.stop()
                return
