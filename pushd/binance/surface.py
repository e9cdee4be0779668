"""The Binance surfaces as gateway ``Surface``s: their listeners, limits, paths and dialect."""

from __future__ import annotations

import msgspec

from pushd.binance import paths
from pushd.binance.dialect import BinanceDialect
from pushd.binance.streams import Market
from pushd.config import BinanceSurfaceConfig, Config, LimitsConfig, WebSocketConfig
from pushd.gateway.requests import Dialect
from pushd.gateway.server import Gateway, Surface


def section(config: Config, market: Market) -> BinanceSurfaceConfig:
    return config.binance.spot if market == "spot" else config.binance.futures


def surface(market: Market, current: Config) -> Surface:
    """The ``market`` surface; ``current`` is the running config until a reload replaces it
    (the dialect reads its section's ping interval and stream limit from the latest one)."""
    latest = [current]

    def listener(config: Config) -> WebSocketConfig:
        latest[0] = config
        own = section(config, market)
        return msgspec.structs.replace(config.websocket, host=own.host, port=own.port, tls=own.tls)

    def limits(config: Config) -> LimitsConfig:
        own = section(config, market)
        return msgspec.structs.replace(config.limits, max_message_bytes=own.max_message_bytes)

    def dialect(gateway: Gateway) -> Dialect:
        return BinanceDialect(
            frozenset(current.markets), market, lambda: section(latest[0], market),
            limits(current), gateway.hub, gateway.end,
        )  # fmt: skip

    return Surface(f"binance.{market}", listener, limits, paths.accepts, dialect)
