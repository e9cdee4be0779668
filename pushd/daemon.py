"""The daemon: the composition root, one Trio nursery tree that owns every service, and its
graceful shutdown.

``Daemon.__init__`` builds every part and gives each its collaborators in its constructor. The
memory-or-Redis choice is made there once: it builds a backplane (``pushd.bus.backplane``),
which the hub follows through and the HTTP API reads states, kicks and stats from; nothing else
asks which bus runs. The one cycle (a bus delivers to the hub; the hub tells the backplane what
it follows) is closed once, by ``Hub.attach``, before anything subscribes.

::

    Daemon.serve                          [when]
    ├── _on_signals        SIGTERM/SIGINT: stop(); SIGHUP: reload()     [pushd run]
    ├── Backplane.run      what the bus side runs:
    │   ├── MemoryBus.run      forgets quiet channels                   [bus.kind memory]
    │   ├── RedisBus.run       the Redis link: outbox, pub/sub, refill  [bus.kind redis]
    │   ├── ControlPlane.run   cluster-wide disconnect, stats, gaps     [bus.kind redis]
    │   └── Leases.run         which compute node publishes what        [redis, computes]
    ├── Gateway.serve      WebSocket listener, flusher, a task per conn [role all, gateway]
    ├── serve_http         hypercorn: publish API, REST, health, metrics, the page
    ├── serve_udp/_tcp     engine events -> Intake -> EngineRouter / Markets  [computes]
    ├── SnapshotPoller.run engine books -> Markets (depth diffs at once)      [computes]
    ├── Markets.run        the market streams' timer (trades, ticker, kline)  [computes]
    ├── Notifier.watchdog  systemd WATCHDOG=1 and STATUS=
    └── _close_later       a verifier a reload replaced, closed once its logins are done

Once every listener is bound it logs ``pushd ready`` with the ports bound (``Ports``: an
address given with port 0 is reported as the port the kernel chose) and tells systemd READY=1.

Shutdown (``stop()``, SIGTERM or SIGINT): readiness goes false, the gateway closes its listener
(new connects are refused at once), answers handshakes in flight with 503 and closes every client
with 1001 (grace period ``SHUTDOWN_GRACE_S``), the backplane leaves (on Redis: what was
published goes out, the node leaves the registry), then the HTTP server stops and the tree is
cancelled.

A service that cannot start (its port is taken) raises ``ServiceError`` naming the service and
the address: the one failure that ends the process. Whatever a peer sends ends at most that peer.

(Over 400 lines: the composition root, the tree it serves and the reload that swaps its parts'
config read best together: each names the parts the others build.)
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
import trio

from ingest import wire
from pushd import __version__, logs, tls
from pushd.auth import Verifier, make_verifier
from pushd.binance.surface import surface as binance_surface
from pushd.bus.backplane import Backplane, LocalBackplane, RedisBackplane
from pushd.bus.control import ControlPlane
from pushd.bus.lease import PRIVATE, Leases
from pushd.bus.memory import MemoryBus
from pushd.bus.model import Bus
from pushd.bus.redis import RedisBus
from pushd.collectors import (
    BusCollector,
    GcCollector,
    HubCollector,
    IngestCollector,
    NodeCollector,
    SupervisorCollector,
)
from pushd.config import Config
from pushd.errors import BusUnavailable, ConfigError, ServiceError
from pushd.feed.intake import Intake, Policy, Source
from pushd.feed.listeners import TcpPeers, serve_tcp, serve_udp
from pushd.feed.poller import SnapshotPoller
from pushd.feed.routing import EngineRouter
from pushd.gateway.hub import Hub
from pushd.gateway.server import Gateway
from pushd.http.api import HttpApi, _stored_value, serve_http
from pushd.liveness import REPORT_VARIABLE
from pushd.market.markets import Markets
from pushd.market.trades import TradeBatch
from pushd.metrics import GatewayMetrics, make_registry
from pushd.notify import Notifier
from pushd.reload import Reload, plan

SHUTDOWN_GRACE_S = 5.0
LAST_TRADE_LOOKBACK = 16  # trades batches read back for the last trade id (gap batches are empty)
LOGIN_DRAIN_S = 10.0  # a replaced login verifier is closed this long after a reload

log = structlog.get_logger("pushd.daemon")


class Ports(msgspec.Struct, frozen=True):
    websocket: int
    http: int
    ingest_udp: int = 0  # 0: that listener is off
    ingest_tcp: int = 0
    binance_spot: int = 0  # the Binance-compatible surfaces (docs/binance.md)
    binance_futures: int = 0


async def start_service(
    nursery: trio.Nursery, what: str, address: str, service: Callable[..., Awaitable[Any]],
    *args: Any,
) -> Any:  # fmt: skip
    """``nursery.start(service, *args)``, with a bind failure told as one ServiceError line."""
    try:
        return await nursery.start(service, *args)
    except (OSError, BaseExceptionGroup) as exc:  # hypercorn binds inside a nursery of its own
        cause = _os_error(exc)
        if cause is None:
            raise
        raise ServiceError(f"cannot serve {what} on {address}: {cause.strerror or cause}") from None


def _os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if (found := _os_error(sub)) is not None:
                return found
    return None


class Daemon:
    """The composition root: every part is built here, each given its collaborators, and the
    memory-or-Redis choice is made here once (``pushd.bus.backplane``)."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier | None = None,
        *,
        load_config: Callable[[], Config] | None = None,
        demo_login: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        """``load_config``: the config file read again (SIGHUP, ``systemctl reload``; ``pushd
        run``); ``demo_login``: the page's demo user (``pushd demo``)."""
        self.config = config
        self.load_config = load_config
        self.registry = make_registry()
        self.metrics = GatewayMetrics(self.registry)
        self.hub = Hub()
        self.verifier = verifier if verifier is not None else make_verifier(config.auth)
        self.poller = SnapshotPoller(config.engine, config.markets, self._on_book)
        self.bus: Bus
        self.gateway: Gateway
        self.markets: Markets
        self.redis: RedisBus | None = None
        self.control: ControlPlane | None = None
        self.leases: Leases | None = None
        self.binance: dict[str, Gateway] = {}  # filled below, once the bus is there
        # the one choice: every other part asks the backplane
        self.backplane: Backplane = (
            self._on_redis() if config.bus.kind == "redis" else self._in_memory()
        )
        # the one cycle: the bus delivers to the hub, and the hub tells the backplane what it
        # follows and asks it for positions and states (the one source of them)
        self.hub.attach(self.backplane)
        # the Binance-compatible surfaces: more listeners over the same hub (docs/binance.md)
        for market in ("spot", "futures") if config.role != "compute" else ():
            if getattr(config.binance, market).enabled:
                surface = binance_surface(market, config)
                self.binance[market] = Gateway(
                    config, self.hub, self.bus, self.verifier, self.metrics, surface,
                    flusher=self.gateway.flusher,
                )  # fmt: skip
        self.registry.register(HubCollector(self.hub, self.surfaces))
        self.api = HttpApi(
            config, self.backplane, self.registry, self.metrics, self.not_ready, demo_login
        )
        self.router = EngineRouter(
            self.bus, self.markets, self._private_gap,
            leads=functools.partial(self.backplane.leads, PRIVATE),
            keeps=functools.partial(self.backplane.keeps, PRIVATE),
            queue_max=config.bus.redis.outage_buffer,
        )  # fmt: skip
        self.intake = Intake(self.router, frozenset(config.markets), ingest_policy(config))
        self.tcp_peers = TcpPeers()
        if self.computes:
            self.registry.register(IngestCollector(
                self.intake, self.poller, list(config.markets), self.tcp_peers, trio.current_time
            ))  # fmt: skip
        self._serving = False
        self.registry.register(
            NodeCollector(__version__, config.role,
                          lambda: self.config.websocket.max_connections, self.not_ready)
        )  # fmt: skip
        self.registry.register(SupervisorCollector(os.environ.get(REPORT_VARIABLE)))
        self.registry.register(GcCollector())
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self.notifier = Notifier()
        self._nursery: trio.Nursery | None = None

    def _in_memory(self) -> LocalBackplane:
        """One process: the memory bus; the states are the ones ``Markets`` computes here."""
        cfg = self.config.bus
        self.bus = bus = MemoryBus(
            self.hub, cfg.history_size, cfg.history_age_s, max_channels=cfg.max_channels
        )
        self.gateway = self._gateway()
        self.markets = self._markets(lambda _symbol: True)
        return LocalBackplane(bus, self, self.markets)

    def _on_redis(self) -> RedisBackplane:
        """A node of a cluster: the Redis bus, the control plane and, where this node
        computes, the leases (which compute node publishes what)."""
        cfg = self.config.bus
        self.bus = self.redis = redis = RedisBus(self.hub, cfg)
        self.gateway = self._gateway()
        self.control = control = ControlPlane(
            redis, self.config.role, self.stats, self.kick, self.resync_private,
        )  # fmt: skip
        if self.computes:
            names = [*self.config.markets, PRIVATE]
            self.leases = Leases(
                redis, control.node_id, names, cfg.redis.lease_s, self._took_over,
                self._lost_lease,
            )  # fmt: skip
        self.registry.register(BusCollector(redis, self.leases))
        backplane = RedisBackplane(redis, control, self.leases)
        self.markets = self._markets(backplane.leads)
        return backplane

    def _gateway(self) -> Gateway:
        return Gateway(self.config, self.hub, self.bus, self.verifier, self.metrics)

    def surfaces(self) -> dict[str, Gateway]:
        """The node's listeners by surface: pushd's own, then the Binance ones."""
        return {"native": self.gateway, **{f"binance_{m}": g for m, g in self.binance.items()}}

    def stats(self) -> dict[str, Any]:
        """This node's counters (``Node``): the native gateway's, with every surface's
        connections counted (``surfaces``: each one's)."""
        surfaces = {name: len(g.connections) for name, g in self.surfaces().items()}
        return {**self.gateway.stats(), "connections": sum(surfaces.values()),
                "surfaces": surfaces}  # fmt: skip

    def kick(self, uid: str) -> int:
        return self.gateway.kick(uid)  # only pushd's own connections log in

    def resync_private(self, gap_at: float | None = None) -> int:
        return self.gateway.resync_private(gap_at)

    def _markets(self, leads: Callable[[str], bool]) -> Markets:
        return Markets(
            dict(self.config.markets), self.bus, self.poller.refresh, stale=self.book_stale,
            leads=leads, tick_late=self.metrics.market_tick_late.observe,
        )  # fmt: skip

    def _on_book(self, snapshot: wire.BookSnapshot) -> None:
        self.markets.book(snapshot)

    def book_stale(self, symbol: str) -> bool:
        """True while the symbol's book may be behind the engine's: the poller is not getting
        books (engine unreachable), or not this symbol's for three of its intervals."""
        if not self.config.engine.snapshot_enabled:
            return False
        interval_s = self.config.markets[symbol].depth_interval_ms / 1000
        limit_s = 3 * interval_s + self.config.engine.request_timeout_s
        return not self.poller.up or self.poller.age(symbol) > limit_s

    def not_ready(self) -> str | None:
        """Why this node should get no new clients now, or None when it should."""
        if not self._serving:
            return "starting or stopping"
        if self.computes and self.config.engine.snapshot_enabled and not self.poller.up:
            return "matching engine unreachable (no book snapshots)"
        if self.computes and (down := self.intake.down(trio.current_time())):
            return "engine source " + "; source ".join(f"{s}: {why}" for s, why in down.items())
        return self.backplane.not_ready()

    @property
    def computes(self) -> bool:
        return self.config.role in ("all", "compute")

    @property
    def serves_clients(self) -> bool:
        return self.config.role in ("all", "gateway")

    async def _took_over(self, name: str, resumed: bool) -> None:
        """This node now publishes ``name`` (a symbol, or the private events); ``resumed``:
        it had it until Redis stopped answering, and kept what it computed meanwhile."""
        if name != PRIVATE:
            self.markets.take_over(name, await self._last_trade_id(name))
        elif not self.router.take_over(resumed=resumed):
            # what the engine sent while nobody published it may be lost: told after it
            self._private_gap("this node took over the private events", leading=True)

    def _lost_lease(self, name: str) -> None:
        if name == PRIVATE:
            self.router.abandon()

    async def _last_trade_id(self, symbol: str) -> int | None:
        """The id of the last trade on the symbol's tape (None: none, or unknown)."""
        channel = self.markets.symbols[symbol].channels["trades"]
        with trio.move_on_after(self.config.bus.redis.timeout_s):
            try:
                _, batches = await self.backplane.recent(channel, LAST_TRADE_LOOKBACK)
            except BusUnavailable as exc:
                log.warning("last trade unknown: the hand-over says gap", symbol=symbol,
                            error=str(exc))  # fmt: skip
                return None
            ids = [
                trade.id
                for raw in batches
                if (batch := _stored_value(raw, TradeBatch)) is not None
                for trade in batch.trades
            ]
            return max(ids, default=None)
        return None

    def _private_gap(self, reason: str, *, leading: bool = False) -> None:
        """Engine frames that may have carried private events were lost: every private
        subscriber in the cluster is told (``Backplane.private_gap``)."""
        self.backplane.private_gap(reason, leading=leading)

    def status(self) -> str:
        """One line for ``systemctl status``: clients, and whether ingest and the bus are well."""
        why = self.not_ready()
        return (
            f"{len(self.gateway.connections)} connections, "
            f"{self.intake.lost_frames} engine frames lost, "
            + (f"not ready: {why}" if why else "ready")
        )

    async def reload(self) -> Reload | None:
        """Read the config again and apply what can change live (``pushd.reload``); a file
        that does not load, or a certificate that does not, changes nothing. No connection
        is closed by a reload."""
        if self.load_config is None:
            log.warning("reload ignored: no config file")
            return None
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            # in a thread: a big file takes seconds to parse (1 MiB of TOML), clients are
            # served meanwhile
            change = plan(self.config, await trio.to_thread.run_sync(self.load_config))
            self._apply(change.config)
        except ConfigError as exc:
            log.error("config reload failed: running config kept", error=str(exc))
            return None
        finally:
            self.notifier.send(READY=1, STATUS=self.status())
        log.info("config reloaded", applied=change.applied)
        if change.refused:
            log.warning("config change needs a restart: running value kept", keys=change.refused)
        logs.set_level(self.config.log.level)  # after the lines above: they are always seen
        return change

    def _apply(self, config: Config) -> None:
        """Everything that can fail first (certificates, the login verifier), then the swap."""
        ws_context, http_context = self.gateway.tls_context, self.api.tls_context
        if ws_context is not None:
            tls.reload_context(ws_context, config.websocket.tls, "websocket")
        if http_context is not None:
            tls.reload_context(http_context, config.http.tls, "http")
        for market, gateway in self.binance.items():
            if gateway.tls_context is not None:
                own = getattr(config.binance, market)
                tls.reload_context(gateway.tls_context, own.tls, f"binance.{market}")
        verifier = self.verifier
        if config.auth != self.config.auth:
            verifier = make_verifier(config.auth)
            if self._nursery is not None:  # logins in progress finish on the old one
                self._nursery.start_soon(_close_later, self.verifier, LOGIN_DRAIN_S)
        self.config = config
        self.verifier = verifier
        self.gateway.reconfigure(config, verifier)
        for gateway in self.binance.values():  # (enabling one takes a restart)
            gateway.reconfigure(config, verifier)
        self.api.reconfigure(config)
        self.intake.policy = msgspec.structs.replace(  # its publish limit is the HTTP API's
            self.intake.policy, publish_max_bytes=config.limits.publish_max_bytes
        )
        self.markets.reconfigure(dict(config.markets))
        self.poller.reconfigure(config.markets)

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
                self._nursery = nursery
                if handle_signals:
                    nursery.start_soon(self._on_signals)
                cfg = self.config
                ws, http_cfg = cfg.websocket, cfg.http
                await nursery.start(self.backplane.run)
                ws_port = http_port = udp_port = tcp_port = 0
                if self.serves_clients:
                    ws_port = await start_service(
                        nursery, "WebSocket", f"{ws.host}:{ws.port}", self.gateway.serve
                    )
                self.api.websocket_port = ws_port
                binance_ports = {}
                for market, gateway in self.binance.items() if self.serves_clients else ():
                    own = getattr(cfg.binance, market)
                    binance_ports[f"binance_{market}"] = await start_service(
                        nursery, f"Binance {market}", f"{own.host}:{own.port}", gateway.serve
                    )
                http_port = await start_service(
                    nursery, "HTTP", f"{http_cfg.host}:{http_cfg.port}",
                    serve_http, self.api.app, http_cfg.host, http_cfg.port, http_stop,
                    self.api.tls_context,
                )  # fmt: skip
                if self.computes:
                    udp_port, tcp_port = await self._start_compute(nursery)
                self._serving = True
                ports = Ports(ws_port, http_port, udp_port, tcp_port, **binance_ports)
                log.info("pushd ready", **msgspec.structs.asdict(ports))
                self.notifier.send(READY=1, STATUS=self.status())
                nursery.start_soon(self.notifier.watchdog, self.status)
                task_status.started(ports)
                await self._stop.wait()
                log.info("shutting down", connections=len(self.gateway.connections))
                self.notifier.send(STOPPING=1, STATUS="draining connections")
                self._serving = False
                async with trio.open_nursery() as closing:  # every listener stops at once
                    for gateway in (self.gateway, *self.binance.values()):
                        closing.start_soon(gateway.shutdown, SHUTDOWN_GRACE_S)
                await self.backplane.leave(SHUTDOWN_GRACE_S)  # what was published goes out
                http_stop.set()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.verifier.aclose()
            self.notifier.close()
            self.stopped.set()
        log.info("stopped")

    async def _start_compute(self, nursery: trio.Nursery) -> tuple[int, int]:
        """Ingest, the book poller and the market timer; returns the ingest ports bound."""
        ingest, udp_port, tcp_port = self.config.ingest, 0, 0
        if ingest.allow_unauthenticated and (ingest.udp_enabled or ingest.tcp_enabled):
            log.warning("ingest takes unauthenticated frames (ingest.allow_unauthenticated): "
                        "anyone who reaches its ports can send as the engine")  # fmt: skip
        if ingest.udp_enabled:
            udp_port = await start_service(
                nursery, "ingest UDP", f"{ingest.udp_host}:{ingest.udp_port}",
                serve_udp, ingest, self.intake,
            )  # fmt: skip
        if ingest.tcp_enabled:
            tcp_port = await start_service(
                nursery, "ingest TCP", f"{ingest.tcp_host}:{ingest.tcp_port}",
                serve_tcp, ingest, self.intake, self.tcp_peers,
            )  # fmt: skip
        if ingest.udp_enabled or ingest.tcp_enabled:
            self.intake.open(trio.current_time())  # a keyed source's silence counts from now
        if self.config.engine.snapshot_enabled:
            nursery.start_soon(self.poller.run)
        nursery.start_soon(self.markets.run)
        return udp_port, tcp_port

    async def _on_signals(self) -> None:
        """SIGTERM/SIGINT stop gracefully; SIGHUP reloads the config."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                self.stop()
                return


def ingest_policy(config: Config) -> Policy:
    """What the intake believes, from ``[ingest]``: the sources' keys and permissions."""
    ingest = config.ingest
    sources = {
        s.id: Source(s.key.encode(), s.private, s.silent_after_s, backend=s.backend)
        for s in ingest.sources
    }
    return Policy(
        sources, ingest.allow_unauthenticated, ingest.replay_window_s,
        publish_max_bytes=config.limits.publish_max_bytes,  # as the HTTP API's
    )  # fmt: skip


async def _close_later(verifier: Verifier, after_s: float) -> None:
    """Close a replaced verifier once the logins that use it are done (or at shutdown)."""
    try:
        await trio.sleep(after_s)
    finally:
        with trio.CancelScope(shield=True):
            await verifier.aclose()
