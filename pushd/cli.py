"""``pushd`` command line: run, demo, sim, token, check-config, files."""

from __future__ import annotations

import argparse
import contextlib
import functools
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import trio

from ingest.sim import DEFAULT_SPECS, Market, SymbolSpec
from ingest.sim_engine import SOURCE_MARKET, SOURCE_PRIVATE, run_feed
from ingest.transport import serve_snapshots
from pushd import __version__, gcpolicy, logs
from pushd import config as config_mod
from pushd.auth import issue_hmac_token
from pushd.config import Config, IngestSourceConfig
from pushd.daemon import Daemon, Ports
from pushd.errors import ConfigError, ServiceError
from pushd.shipped import shipped_files
from pushd.supervisor import Supervisor, watch_lifeline

DEMO_UID = "1001"


def _load(path: Path | None) -> Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(main: Callable[[], Awaitable[None]]) -> int:
    """Run the daemon; a service that cannot start is one line on stderr and exit code 1."""
    failed: list[str] = []
    try:
        trio.run(main)
    except* (ServiceError, ConfigError) as group:
        failed += _messages(group)
    for message in failed:
        print(f"pushd: {message}", file=sys.stderr)
    return 1 if failed else 0


def _messages(exc: BaseException) -> list[str]:
    """The messages of the leaves of a (nested) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return [m for sub in exc.exceptions for m in _messages(sub)]
    return [str(exc)]


def _run_config(args: argparse.Namespace) -> Config:
    """The config file with this node's command-line settings; what ``run`` needs on top of a
    valid file. Read at start and again at each reload (SIGHUP). Raises ConfigError."""
    config = config_mod.with_node(
        config_mod.load(args.config), role=args.role, websocket_port=args.websocket_port,
        http_port=args.http_port, reuse_port=True if args.reuse_port else None,
        binance_ports={"spot": args.binance_spot_port, "futures": args.binance_futures_port},
    )  # fmt: skip
    if args.workers and (config.bus.kind != "redis" or args.config is None):
        raise ConfigError("--workers needs a config file with bus.kind = 'redis' "
                          "(the processes share channels through it)")  # fmt: skip
    if config.auth.kind == "hmac" and not config.auth.hmac.secret:
        raise ConfigError(
            "auth.hmac.secret is empty: set it (tokens are signed with it), "
            "or use `pushd demo` to try pushd with a throwaway one"
        )
    ingest = config.ingest
    if (config.role != "gateway" and (ingest.udp_enabled or ingest.tcp_enabled)
            and not ingest.sources and not ingest.allow_unauthenticated):  # fmt: skip
        raise ConfigError(
            "ingest: no [[ingest.sources]] keys, so every engine frame would be refused: give "
            "each engine source a key (docs/wire.md), or set ingest.allow_unauthenticated = "
            "true where only the engine can reach the ingest ports"
        )
    return config


SIM_SOURCES = {SOURCE_MARKET: "market data", SOURCE_PRIVATE: "private events"}


def _with_sim_keys(config: Config) -> Config:
    """``pushd demo``: the simulator's two sources get made-up keys where the config has none
    (the private one may carry private events); the keys never leave the process."""
    ingest = config.ingest
    added = [
        IngestSourceConfig(id=src, key=secrets.token_urlsafe(32), private=src == SOURCE_PRIVATE)
        for src in SIM_SOURCES
        if ingest.key(src) is None
    ]
    ingest = msgspec.structs.replace(ingest, sources=[*ingest.sources, *added])
    return msgspec.structs.replace(config, ingest=ingest)


def _with_binance(config: Config) -> Config:
    """``pushd demo`` serves both Binance surfaces (docs/binance.md), each symbol's tick and
    step the simulator's where the config sets none."""
    spot = msgspec.structs.replace(config.binance.spot, enabled=True)
    futures = msgspec.structs.replace(config.binance.futures, enabled=True)
    binance = msgspec.structs.replace(config.binance, spot=spot, futures=futures)
    markets = {
        spec.symbol: msgspec.structs.replace(
            market,
            tick_size=market.tick_size or f"{10**-spec.price_scale:.{spec.price_scale}f}",
            step_size=market.step_size or f"{10**-spec.qty_scale:.{spec.qty_scale}f}",
        )
        for spec, market in zip(_specs(config), config.markets.values(), strict=True)
    }
    return msgspec.structs.replace(config, binance=binance, markets=markets)


def binance_urls(config: Config, ports: Ports, web: str) -> str:
    """What to paste into Binance clients (docs/binance.md has each client's lines)."""
    spot, futures = config.binance.spot, config.binance.futures
    lines = ""
    if ports.binance_spot:
        scheme = "wss" if spot.tls.enabled else "ws"
        lines += (f"  Binance spot: {scheme}://{spot.host}:{ports.binance_spot}/stream"
                  f"  (ws/ and stream), REST {web}/api/v3\n")  # fmt: skip
    if ports.binance_futures:
        scheme = "wss" if futures.tls.enabled else "ws"
        lines += (f"  Binance USD-M: {scheme}://{futures.host}:{ports.binance_futures}/ws"
                  f"  (ws/ and stream), REST {web}/fapi/v1\n")  # fmt: skip
    return lines


def _sim_keys(config: Config) -> dict[int, bytes]:
    """The simulator's keys, from the config pushd reads. Raises ConfigError when one is
    missing and pushd would refuse the unsealed frames."""
    keys = {src: key for src in SIM_SOURCES if (key := config.ingest.key(src)) is not None}
    missing = [f"{src} ({what})" for src, what in SIM_SOURCES.items() if src not in keys]
    if missing and not config.ingest.allow_unauthenticated:
        raise ConfigError(f"ingest.sources: the simulator sends as sources {' and '.join(missing)}:"
                          " give them keys (the daemon's config file is read)")  # fmt: skip
    return keys


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _run_config(args)
    except ConfigError as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    if args.workers:
        supervisor = Supervisor(config, args.config, args.workers)
        return _serve(supervisor.run)

    async def serve() -> None:
        reload = functools.partial(_run_config, args) if args.config is not None else None
        daemon = Daemon(config, load_config=reload)
        gcpolicy.settle()  # the daemon is built: what is alive now lives as long as the process
        async with trio.open_nursery() as nursery:  # a child of `--workers`: ends with it
            nursery.start_soon(watch_lifeline, daemon.stop)
            await daemon.serve(handle_signals=True)
            nursery.cancel_scope.cancel()

    return _serve(serve)


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulator and daemon in one process on loopback, with a demo login. The configured HMAC
    secret and publish token are used when set (so `pushd token` for that config works);
    only missing ones are made up for this run."""
    config = _load(args.config)
    hmac_cfg = config.auth.hmac
    if not hmac_cfg.secret:
        hmac_cfg = msgspec.structs.replace(hmac_cfg, secret=secrets.token_urlsafe(32))
    auth = msgspec.structs.replace(config.auth, kind="hmac", hmac=hmac_cfg)
    http = config.http
    if not http.publish_token:
        http = msgspec.structs.replace(http, publish_token=secrets.token_urlsafe(16))
    config = _with_sim_keys(msgspec.structs.replace(config, auth=auth, http=http))
    config = _with_binance(config)
    logs.configure(config.log.level, config.log.format)
    market = Market(seed=args.seed, rate=args.rate, specs=_specs(config))

    def demo_login() -> dict[str, str]:
        """The page's "log in as the demo user" button (served by the demo only)."""
        return {
            "uid": DEMO_UID,
            "token": issue_hmac_token(hmac_cfg.secret, DEMO_UID, hmac_cfg.token_ttl_s),
        }

    async def main() -> None:
        engine = config.engine
        async with trio.open_nursery() as nursery:
            snapshot_port = await nursery.start(
                serve_snapshots, market.book, engine.snapshot_host, engine.snapshot_port
            )
            # snapshot_port 0: the engine took a free port, which the daemon polls
            engine = msgspec.structs.replace(engine, snapshot_port=snapshot_port)
            daemon = Daemon(msgspec.structs.replace(config, engine=engine), demo_login=demo_login)
            started = time.perf_counter()
            past = market.history(int(args.history_h * 3_600_000), time.time_ns() // 1_000_000)
            daemon.markets.replay(past)
            history = (
                f"{args.history_h:g} h, {len(past):,} trades, "
                f"made and loaded in {time.perf_counter() - started:.1f} s"
            )
            ports: Ports = await nursery.start(functools.partial(daemon.serve, handle_signals=True))
            nursery.start_soon(functools.partial(
                run_feed, market, host=config.ingest.tcp_host, tcp_port=ports.ingest_tcp,
                udp_port=ports.ingest_udp or None, keys=_sim_keys(config)))  # fmt: skip
            token = demo_login()["token"]
            web = f"http://{config.http.host}:{ports.http}"
            print(
                f"\npushd demo is running (Ctrl-C stops it)\n"
                f"  market page : {web}/\n"
                f"  WebSocket   : ws://{config.websocket.host}:{ports.websocket}/ws\n"
                f"  HTTP API    : {web}/v1/...  (publish token {http.publish_token})\n"
                f'  demo login  : {{"op":"auth","token":"{token}"}}  (uid {DEMO_UID})\n'
                + binance_urls(config, ports, web)
                + f"  symbols     : {', '.join(config.markets)} (simulated, seed {args.seed})\n"
                f"  history     : {history}\n",
                flush=True,
            )
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()

    return _serve(main)


def _specs(config: Config) -> tuple[SymbolSpec, ...]:
    """The simulator's specs for the configured symbols (unknown ones get a generic spec)."""
    known = {spec.symbol: spec for spec in DEFAULT_SPECS}
    return tuple(
        known.get(symbol, SymbolSpec(symbol, 10.0, price_scale=3, qty_scale=1, typical_lots=500))
        for symbol in config.markets
    )


def cmd_sim(args: argparse.Namespace) -> int:
    """The simulated matching engine alone, sending to a pushd configured by ``--config``."""
    config = _load(args.config)
    try:
        keys = _sim_keys(config)
    except ConfigError as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    market = Market(seed=args.seed, rate=args.rate, specs=_specs(config))
    ingest, engine = config.ingest, config.engine

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_snapshots, market.book, engine.snapshot_host, engine.snapshot_port
            )
            udp = f" and :{ingest.udp_port} (UDP)" if ingest.udp_enabled else ""
            print(
                f"simulated engine: books on {engine.snapshot_host}:{engine.snapshot_port}, "
                f"events to {ingest.tcp_host}:{ingest.tcp_port} (TCP){udp}",
                flush=True,
            )
            await run_feed(
                market,
                host=ingest.tcp_host,
                tcp_port=ingest.tcp_port,
                udp_port=ingest.udp_port if ingest.udp_enabled and not args.tcp_only else None,
                step_ms=args.step_ms,
                keys=keys,
            )

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config)
    secret = config.auth.hmac.secret
    if not secret:
        print("pushd: auth.hmac.secret is not set in the config", file=sys.stderr)
        return 2
    ttl = args.ttl if args.ttl is not None else config.auth.hmac.token_ttl_s
    try:
        print(issue_hmac_token(secret, args.uid, ttl))
    except Exception as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args.config)
    print(f"{args.config}: ok")
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    for path in shipped_files():
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pushd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="TOML config file (defaults if omitted)")
    run.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="N gateway processes on one port plus a compute process (Redis bus)",
    )
    run.add_argument("--role", choices=["all", "gateway", "compute"], help="overrides `role`")
    run.add_argument("--websocket-port", type=int, help="overrides websocket.port")
    run.add_argument("--http-port", type=int, help="overrides http.port")
    run.add_argument("--reuse-port", action="store_true", help="sets websocket.reuse_port")
    run.add_argument("--binance-spot-port", type=int, help="overrides binance.spot.port")
    run.add_argument("--binance-futures-port", type=int, help="overrides binance.futures.port")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run everything on loopback with a demo login")
    demo.add_argument("--config", type=Path)
    demo.add_argument(
        "--history-h", type=float, default=24.0, metavar="H",
        help="hours of simulated past trades loaded at start (default 24; 0: none)",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    for name, helptext in (("demo", None), ("sim", "run the simulated matching engine")):
        p = demo if name == "demo" else sub.add_parser(name, help=helptext)
        p.add_argument("--seed", type=int, default=1, help="random seed (reproducible runs)")
        p.add_argument("--rate", type=float, default=1.0, help="trade rate multiplier")
        if name == "sim":
            p.add_argument("--config", type=Path)
            p.add_argument("--step-ms", type=int, default=50)
            p.add_argument("--tcp-only", action="store_true", help="market data over TCP too")
            p.set_defaults(func=cmd_sim)
    token = sub.add_parser("token", help="issue an HMAC login token")
    token.add_argument("--uid", required=True)
    token.add_argument("--ttl", type=int, help="seconds (default auth.hmac.token_ttl_s)")
    token.add_argument("--config", type=Path)
    token.set_defaults(func=cmd_token)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=cmd_check_config)
    files = sub.add_parser(
        "files", help="where the example config, systemd unit, alert rules and dashboard are"
    )
    files.set_defaults(func=cmd_files)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
