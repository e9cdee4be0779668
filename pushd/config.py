"""Configuration: TOML decoded into frozen msgspec Structs, every setting defaulted.

``pushd run`` with no file serves on loopback with these defaults. A wrong key, type or value
stops start-up with one line naming the key (``ConfigError``); so does a file that cannot be
read or is not UTF-8 TOML (``read`` is the I/O, ``parse`` the rest). ``pushd.example.toml``
documents every setting; a test keeps it loadable and complete.

Secret fields (login secrets and keys, the publish token) are named per section
(``_secrets``): a section's ``repr`` and ``redacted()`` mask them and the credentials of its
URLs, so a config in a log line or a dump shows no secret.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

import coredis
import httpx
import msgspec

from ingest.wire import MIN_KEY_BYTES, Decimal  # Decimal: the engine's decimal-string form
from pushd.channels import SYMBOL_PATTERN
from pushd.errors import ConfigError
from pushd.gateway import ratelimit
from pushd.logs import MASK, redact, redacted

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
AssetName = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Z]{1,20}$")]
# a decimal above 0 (a digit other than 0 somewhere), as the engine writes them
PositiveDecimal = Annotated[
    str, msgspec.Meta(pattern=r"^(?=[0-9.]*[1-9])[0-9]{1,30}(\.[0-9]{1,30})?$")
]
DEPTH_LEVEL_BYTES = 64  # a generous ["price","qty"] pair in JSON (typically ~25)
MAX_FILE_BYTES = 1 << 20  # a config is a few KiB (~150 bytes a market); more is a mistake


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    _secrets: ClassVar[frozenset[str]] = frozenset()  # fields never shown (``redacted``)

    def redacted(self) -> dict[str, Any]:
        """The section as plain data fit for a log line or a dump: secret fields masked
        (when set), credentials cut out of every URL."""
        out: dict[str, Any] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in self._secrets and value:
                out[name] = MASK
            elif isinstance(value, _Section):
                out[name] = value.redacted()
            elif isinstance(value, dict):
                out[name] = {key: item.redacted() for key, item in value.items()}
            else:
                out[name] = redacted(msgspec.to_builtins(value))  # URLs' credentials cut
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"{type(self).__name__}({fields})"


class TlsConfig(_Section, frozen=True):
    """A PEM certificate chain and its key: set both to serve TLS (re-read on reload)."""

    certificate: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


class WebSocketConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8765
    paths: list[str] = msgspec.field(default_factory=lambda: ["/", "/ws"])
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    max_connections: PositiveInt = 15000
    max_connections_per_ip: PositiveInt = 500
    handshakes_per_second: PositiveFloat = 2000.0
    backlog: PositiveInt = 4096
    # SO_REUSEPORT: several processes accept on one port (set by `pushd run --workers`)
    reuse_port: bool = False
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)  # wss:// when set


class LimitsConfig(_Section, frozen=True):
    max_message_bytes: PositiveInt = 4096
    outbound_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 256 * 1024
    socket_send_buffer_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024  # 0: kernel's
    messages_per_second: PositiveFloat = 20.0
    message_burst: PositiveInt = 50
    max_subscriptions: PositiveInt = 200
    failed_logins_per_minute: PositiveFloat = 5.0
    failed_login_burst: PositiveInt = 5
    handshake_timeout_s: PositiveFloat = 10.0
    stall_timeout_s: PositiveFloat = 10.0
    close_timeout_s: PositiveFloat = 2.0
    # after a flush round this long or longer, while publishers keep the loop busy, the next
    # round first waits half as long as the last took, at most this, so frames published
    # one at a time share one send per connection; idle loops and cheap rounds flush at
    # once. 0: never wait
    coalesce_ms: Annotated[float, msgspec.Meta(ge=0, le=100)] = 5.0
    # what received frames cost (pushd.gateway.ratelimit): every frame of any opcode takes a
    # token (a data frame arriving in pieces, one per piece; a read completing no frame, one);
    # past the budget: close 4001
    frames_per_second: PositiveFloat = ratelimit.FRAMES_PER_SECOND
    frame_burst: PositiveInt = ratelimit.FRAME_BURST
    max_fragments_per_message: PositiveInt = ratelimit.MAX_FRAGMENTS_PER_MESSAGE  # more: 1009
    message_timeout_s: PositiveFloat = ratelimit.MESSAGE_TIMEOUT_S  # to finish one: else 1008
    max_pongs_owed: PositiveInt = ratelimit.MAX_PONGS_OWED  # unwritten; then the latest only
    # a logged-in client is told this long before its token's exp ({"event":"@auth",...});
    # at exp, unless it sent a fresh token, it is closed with 4004
    token_notice_s: PositiveFloat = 60.0

    @property
    def publish_max_bytes(self) -> int:
        """A backend publish's data at most (the HTTP API and the engine link alike): a
        quarter of a connection's outbound buffer, so one message never fills it."""
        return self.outbound_buffer_bytes // 4


class HttpConfig(_Section, frozen=True):
    _secrets = frozenset({"publish_token"})
    host: str = "127.0.0.1"
    port: Port = 8766
    publish_token: str = ""
    max_batch: PositiveInt = 1000
    allow_market_publish: bool = False  # load tests only: a generator stands in for the engine
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)  # https:// when set


class HmacAuthConfig(_Section, frozen=True):
    _secrets = frozenset({"secret"})
    secret: str = ""
    token_ttl_s: PositiveInt = 86400


class JwtAuthConfig(_Section, frozen=True):
    _secrets = frozenset({"key"})
    key: str = ""
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    uid_claim: str = "sub"
    audience: str | None = None
    issuer: str | None = None
    leeway_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class HttpAuthConfig(_Section, frozen=True):
    url: str = ""
    timeout_s: PositiveFloat = 2.0
    cache_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    cache_size: PositiveInt = 10000
    uid_field: str = "uid"
    # verifications in flight on the node at once (and the HTTP pool's size); a login that
    # waits timeout_s for a slot is answered "unavailable" (error 11)
    max_concurrent: PositiveInt = 32
    exp_field: str = "exp"  # field of the answer with the token's expiry (Unix s); optional


class AuthConfig(_Section, frozen=True):
    kind: Literal["hmac", "jwt", "http"] = "hmac"
    hmac: HmacAuthConfig = msgspec.field(default_factory=HmacAuthConfig)
    jwt: JwtAuthConfig = msgspec.field(default_factory=JwtAuthConfig)
    http: HttpAuthConfig = msgspec.field(default_factory=HttpAuthConfig)


class FundingConfig(_Section, frozen=True):
    """One symbol's funding and mark-price parameters (Binance USDT-M defaults; docs/streams.md)."""

    interval_h: Annotated[int, msgspec.Meta(ge=1, le=24)] = 8
    interest_rate: Decimal = "0.0001"  # per funding interval (0.03% a day at 8 h)
    clamp: Decimal = "0.0005"
    cap: Decimal = "0.0075"
    impact_notional: Decimal = "10000"  # quote currency
    premium_sample_ms: Annotated[int, msgspec.Meta(ge=100)] = 5000
    basis_window_min: PositiveInt = 30
    index_stale_ms: PositiveInt = 10_000
    price_decimals: Annotated[int, msgspec.Meta(ge=0, le=18)] = 8
    rate_decimals: Annotated[int, msgspec.Meta(ge=0, le=18)] = 8


class MarketConfig(_Section, frozen=True):
    """One symbol's settings."""

    depth_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 100
    depth_levels: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    trades_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 100
    ticker_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 1000
    kline_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 1000
    mark_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 1000
    funding: FundingConfig = msgspec.field(default_factory=FundingConfig)
    # what the Binance surface's exchangeInfo says of the symbol (None: derived from its name,
    # ``pushd.binance.rest.symbol_info``)
    base_asset: AssetName | None = None
    quote_asset: AssetName | None = None
    tick_size: PositiveDecimal | None = None
    step_size: PositiveDecimal | None = None
    min_notional: PositiveDecimal | None = None


class BinanceSurfaceConfig(_Section, frozen=True):
    """One Binance-compatible listener (docs/binance.md): spot or USD-M futures."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9443
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)  # wss:// when set
    max_streams: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1024  # per connection
    # a SUBSCRIBE of 200 stream names is ~5 KB; of 1,024 ~30 KB
    max_message_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 20)] = 65536
    ping_interval_s: PositiveFloat = 20.0  # server pings (Binance: spot 20 s, futures 180 s)
    # no pong this long after a ping: closed (Binance: spot 60 s, futures 600 s)
    pong_timeout_s: PositiveFloat = 60.0


def _futures_surface() -> BinanceSurfaceConfig:
    return BinanceSurfaceConfig(
        port=9444, max_streams=200, ping_interval_s=180.0, pong_timeout_s=600.0
    )


class BinanceConfig(_Section, frozen=True):
    spot: BinanceSurfaceConfig = msgspec.field(default_factory=BinanceSurfaceConfig)
    futures: BinanceSurfaceConfig = msgspec.field(default_factory=_futures_surface)
    # Binance REST request weight per client address per minute, both surfaces together, each
    # route weighing as on Binance (pushd.binance.budget); past it 429 with Retry-After
    # (Binance: 6,000 a minute spot, 2,400 USD-M). 0: no budget
    rest_weight_per_minute: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 6000


MAX_INGEST_SOURCES = 256  # sources with a key; every per-source table is bounded by it


class IngestSourceConfig(_Section, frozen=True):
    """One engine source (a frame's ``src``) and the key its frames are sealed with."""

    _secrets = frozenset({"key"})

    id: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    key: str = ""  # secret: HMAC-SHA256 key (its UTF-8 bytes, at least 32); or key_file
    key_file: str = ""  # a file holding the key (whitespace around it ignored)
    private: bool = False  # may carry order/balance/position/account events (and their gaps)
    # may publish what backends own (notice, user_<uid>_<stream>): a backend's way in
    backend: bool = False
    # no valid frame for this long: the source is down (/readyz, pushd_ingest_source_up);
    # senders beat once a second when idle. 0: a source that may be silent
    silent_after_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0


class IngestConfig(_Section, frozen=True):
    udp_enabled: bool = True
    udp_host: str = "127.0.0.1"
    udp_port: Port = 7001
    udp_receive_buffer_bytes: PositiveInt = 8 * 1024 * 1024
    tcp_enabled: bool = True
    tcp_host: str = "127.0.0.1"
    tcp_port: Port = 7002
    max_tcp_peers: PositiveInt = 64
    # authenticated engine link (docs/wire.md): frames sealed with their source's key
    sources: list[IngestSourceConfig] = msgspec.field(default_factory=list)
    # true: unsealed frames are also taken, from any src without a key (a network only the
    # engine can reach; `pushd run` refuses to start with no keys unless this is set)
    allow_unauthenticated: bool = False
    # a TCP peer that has sent no valid frame this long after connecting is dropped
    auth_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    # a sealed frame's seal time may differ from pushd's clock by this much (replays after
    # a restart, clock skew); epochs may be at most this far ahead of the clock
    replay_window_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    # an authenticated TCP peer with no accepted frame this long is closed, its slot freed
    # (senders beat once a second when idle; a replay or a refused frame does not count).
    # 0: never
    peer_idle_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    # a TCP peer whose acks cannot be written for this long (it does not read them) is closed
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0

    def key(self, src: int) -> bytes | None:
        """The key of source ``src`` (None: no key configured)."""
        for source in self.sources:
            if source.id == src:
                return source.key.encode()
        return None


class EngineConfig(_Section, frozen=True):
    """Where the snapshot poller asks the matching engine for books."""

    snapshot_enabled: bool = True
    snapshot_host: str = "127.0.0.1"
    snapshot_port: Port = 7003
    request_timeout_s: PositiveFloat = 2.0
    reconnect_initial_s: PositiveFloat = 0.2
    reconnect_max_s: PositiveFloat = 5.0


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RedisBusConfig(_Section, frozen=True):
    url: str = "redis://127.0.0.1:6379"
    cluster: bool = False  # Redis Cluster: sharded pub/sub (Redis >= 7), hash-tagged keys
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z.:_-]{1,32}$")] = "pushd"
    # messages a node keeps while Redis is unreachable, then drops (counted)
    outage_buffer: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 100_000
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    # every connection to Redis is PINGed this often; one silent for timeout_s before its
    # PONG is dead (a pub/sub connection still receiving is not): the node is not ready and
    # the connection replaced (bus/link.py)
    probe_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 1.0
    # compute nodes: a symbol's publisher holds a lease this long; a standby takes over
    # within lease_s + lease_s / 3 of the holder's death
    lease_s: Annotated[float, msgspec.Meta(ge=0.3, le=60)] = 3.0


class BusConfig(_Section, frozen=True):
    kind: Literal["memory", "redis"] = "memory"
    # what a reconnecting client can recover (trades, notice, private streams), per channel
    history_size: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 200
    history_age_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    # memory bus: channels kept (seq, history); past it the longest-quiet unfollowed go
    max_channels: Annotated[int, msgspec.Meta(ge=100, le=10_000_000)] = 100_000
    redis: RedisBusConfig = msgspec.field(default_factory=RedisBusConfig)


class WorkersConfig(_Section, frozen=True):
    """``pushd run --workers N``: how the supervisor watches its children."""

    # a child whose event loop is silent this long (it beats every half of it) is killed
    # (SIGKILL) and replaced; read by the supervisor at start
    watchdog_s: Annotated[float, msgspec.Meta(ge=0.5, le=300)] = 5.0


def _default_markets() -> dict[str, MarketConfig]:
    return {symbol: MarketConfig() for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT")}


class Config(_Section, frozen=True):
    # all: one process does everything (the default); gateway: WebSocket + HTTP API only;
    # compute: ingest, book poller and market streams only (needs bus.kind = "redis")
    role: Literal["all", "gateway", "compute"] = "all"
    websocket: WebSocketConfig = msgspec.field(default_factory=WebSocketConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    markets: dict[str, MarketConfig] = msgspec.field(default_factory=_default_markets)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    binance: BinanceConfig = msgspec.field(default_factory=BinanceConfig)


MIN_PEER_IDLE_S = 2.0  # twice the senders' heartbeat (docs/wire.md)

_AT = re.compile(r"^(?P<msg>.*) - at `\$\.?(?P<path>[^`]*)`$")


def from_dict(raw: dict[str, object], *, source: str = "config") -> Config:
    """Build a Config from already-parsed data, checking every key, type and value."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        if match is None:
            raise ConfigError(f"{source}: {exc}") from None
        path = re.sub(r"\[(\d+)\]", r".\1", match["path"]).replace("['", ".").replace("']", "")
        if path.startswith("markets[...]"):  # msgspec does not name dict keys: find the symbol
            path = f"markets.{_bad_market(raw.get('markets'))}{path.removeprefix('markets[...]')}"
        raise ConfigError(f"{source}: {path or 'top level'}: {match['msg']}") from None
    _check(config, source)
    return _with_keys(config, source)


def _with_keys(config: Config, source: str) -> Config:
    """Each ingest source's ``key_file`` read into its ``key`` (checked: long enough)."""
    sources = []
    for i, src in enumerate(config.ingest.sources):
        where = f"{source}: ingest.sources.{i}"
        if bool(src.key) == bool(src.key_file):
            raise ConfigError(f"{where}: set key or key_file (one of them) for source {src.id}")
        if src.key_file:
            try:  # read like the config itself: a FIFO or a device is refused, not waited on
                key_path = Path(src.key_file)
                key = read(key_path).decode("utf-8").strip()
            except ConfigError as exc:
                why = str(exc).removeprefix(f"{key_path}: ")
                raise ConfigError(f"{where}.key_file: {why}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{where}.key_file: cannot read: not UTF-8") from None
            src = msgspec.structs.replace(src, key=key, key_file="")
        if len(src.key.encode()) < MIN_KEY_BYTES:
            raise ConfigError(f"{where}: the key of source {src.id} is shorter than "
                              f"{MIN_KEY_BYTES} bytes")  # fmt: skip
        sources.append(src)
    if not sources:
        return config
    ingest = msgspec.structs.replace(config.ingest, sources=sources)
    return msgspec.structs.replace(config, ingest=ingest)


def _bad_market(markets: object) -> str:
    """The symbol of the first market table that does not convert."""
    for symbol, table in markets.items() if isinstance(markets, dict) else ():
        try:
            msgspec.convert(table, MarketConfig)
        except msgspec.ValidationError:
            return str(symbol)
    return "[...]"


def load(path: Path | None) -> Config:
    """Read and check the TOML file at ``path`` (or defaults for None). Raises ConfigError."""
    if path is None:
        return Config()
    return parse(read(path), str(path))


def read(path: Path) -> bytes:
    """The bytes of a config file. Only a regular file of at most ``MAX_FILE_BYTES`` is read:
    a FIFO would block the reading loop and a device (``/dev/zero``) never end. Opened
    non-blocking, so a FIFO is refused rather than waited on. Raises ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    too_big = f"{path}: the file is more than {MAX_FILE_BYTES} bytes (a config is a few KiB)"
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: cannot read: Is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: cannot read: not a regular file (a FIFO, socket or device)")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(too_big)
        data = b""
        while chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(data)):  # a file may still grow
            data += chunk
            if len(data) > MAX_FILE_BYTES:
                raise ConfigError(too_big)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    finally:
        os.close(fd)
    return data


def _reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def parse(data: bytes, source: str) -> Config:
    """A config file's bytes, decoded as UTF-8 TOML and checked (sans-IO). Raises ConfigError
    naming ``source`` and the problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            f"{source}: not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
            "(save the file as UTF-8)"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{source}: TOML nested too deeply") from None
    return from_dict(raw, source=source)


def with_node(
    config: Config,
    *,
    role: str | None = None,
    websocket_port: int | None = None,
    http_port: int | None = None,
    reuse_port: bool | None = None,
    binance_ports: Mapping[str, int | None] | None = None,
) -> Config:
    """The config with one node's own settings (command-line options) put in; checked again.
    ``binance_ports``: a Binance surface's port, by market (``spot``, ``futures``)."""
    raw = msgspec.to_builtins(config)
    if role is not None:
        raw["role"] = role
    if websocket_port is not None:
        raw["websocket"]["port"] = websocket_port
    if http_port is not None:
        raw["http"]["port"] = http_port
    if reuse_port is not None:
        raw["websocket"]["reuse_port"] = reuse_port
    for market, port in (binance_ports or {}).items():
        if port is not None:
            raw["binance"][market]["port"] = port
    return from_dict(raw, source="command line")


def _check(config: Config, source: str) -> None:
    """Rules that span keys, or that a type annotation cannot say."""
    for symbol in config.markets:
        if not SYMBOL_PATTERN.fullmatch(symbol):
            raise ConfigError(f"{source}: markets.{symbol}: symbol must be 2-32 of A-Z, 0-9")
    if not config.markets:
        raise ConfigError(f"{source}: markets: at least one symbol is needed")
    for symbol, market in config.markets.items():
        # a new depth subscriber's snapshot goes through the outbound buffer in one piece
        need = market.depth_levels * 2 * DEPTH_LEVEL_BYTES
        if need > config.limits.outbound_buffer_bytes:
            raise ConfigError(
                f"{source}: markets.{symbol}.depth_levels: a {market.depth_levels}-level "
                f"snapshot needs limits.outbound_buffer_bytes >= {need}"
            )
    if 0 < config.ingest.peer_idle_s < MIN_PEER_IDLE_S:  # a healthy idle sender beats at 1 s
        raise ConfigError(
            f"{source}: ingest.peer_idle_s: 0 (never) or at least {MIN_PEER_IDLE_S:g} s "
            "(senders beat once a second when idle)"
        )
    if config.role != "all" and config.bus.kind != "redis":
        raise ConfigError(
            f"{source}: role: {config.role!r} needs bus.kind = 'redis' (nodes share nothing else)"
        )
    if config.bus.kind == "redis":
        _check_redis_url(config.bus.redis.url, source)
    for section, tls in (("websocket", config.websocket.tls), ("http", config.http.tls),
                         ("binance.spot", config.binance.spot.tls),
                         ("binance.futures", config.binance.futures.tls)):  # fmt: skip
        if bool(tls.certificate) != bool(tls.key):
            raise ConfigError(f"{source}: {section}.tls: set both certificate and key, or neither")
    for ws_path in config.websocket.paths:
        if not ws_path.startswith("/"):
            raise ConfigError(f"{source}: websocket.paths: {ws_path!r} must start with '/'")
    ids = [src.id for src in config.ingest.sources]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: ingest.sources: a source id appears twice")
    if len(ids) > MAX_INGEST_SOURCES:
        raise ConfigError(f"{source}: ingest.sources: at most {MAX_INGEST_SOURCES} sources")
    auth = config.auth
    if auth.kind == "jwt" and not auth.jwt.key:
        raise ConfigError(f"{source}: auth.jwt.key: required when auth.kind = 'jwt'")
    if auth.kind == "http":
        if not auth.http.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{source}: auth.http.url: an http(s) URL is required for kind 'http'"
            )
        try:
            if not httpx.URL(auth.http.url).host:
                raise ValueError("no host")
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            reason = _without_secrets(str(exc), auth.http.url)
            raise ConfigError(f"{source}: auth.http.url: not a valid URL ({reason})") from None


def _check_redis_url(url: str, source: str) -> None:
    """The URL as the bus will read it (coredis, or ``urlsplit`` for a Cluster's node)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{source}: bus.redis.url: want a redis://, rediss:// or unix:// URL")
    try:
        _ = urlsplit(url).port
        coredis.Redis.from_url(url)  # builds a client (its settings), connects nowhere
    except (ValueError, TypeError) as exc:
        reason = _without_secrets(str(exc), url)
        raise ConfigError(f"{source}: bus.redis.url: not a valid Redis URL ({reason})") from None


def _without_secrets(text: str, url: str) -> str:
    """A library's complaint about ``url`` with the URL's credentials masked in it."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        secrets = [parts.password, *(value for key, value in query if key == "password")]
    except ValueError:
        secrets = []
    for secret in filter(None, secrets):
        text = text.replace(secret, MASK)
    return redact(text)
