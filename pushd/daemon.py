"""The daemon: one Trio nursery tree that owns every service, and its graceful shutdown.

::

    Daemon.serve
    ├── Gateway.serve          WebSocket listener, flusher, one task per connection
    ├── serve_http             hypercorn: publish API, health, metrics
    └── (later issues)         ingest listeners, snapshot poller, market computations

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

from pushd.auth import Verifier, make_verifier
from pushd.bus import MemoryBus, Publisher
from pushd.config import AuthConfig, Config, HmacAuthConfig
from pushd.gateway import Gateway
from pushd.http_api import HttpApi, serve_http
from pushd.hub import Hub
from pushd.metrics import GatewayMetrics, HubCollector, make_registry

SHUTDOWN_GRACE_S = 5.0

log = structlog.get_logger("pushd.daemon")


class Ports(msgspec.Struct, frozen=True):
    websocket: int
    http: int


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
        self.api = HttpApi(config, self.publisher, self.gateway, self.registry, self.metrics)
        self._stop = trio.Event()

    @property
    def hmac_config(self) -> HmacAuthConfig:
        return self.config.auth.hmac

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
                http_cfg = self.config.http
                http_port = await nursery.start(
                    serve_http, self.api, http_cfg.host, http_cfg.port, http_stop
                )
                self.api.ready = True
                ports = Ports(websocket=ws_port, http=http_port)
                log.info("pushd ready", websocket_port=ws_port, http_port=http_port)
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
        log.info("stopped")

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.stop()
                return
