"""What the Binance surfaces' requests cost (sans-IO: the caller gives the clock).

REST: Binance gives each route a *request weight* (``weight``: 1 for ``ping``, 20 for spot
``exchangeInfo``, 5 to 250 for ``depth`` by ``limit``, ...), counts the weight an address used
in the minute, says it in the answer's ``X-MBX-USED-WEIGHT`` / ``X-MBX-USED-WEIGHT-1M`` headers,
and answers an address past its limit with 429, ``{"code":-1003,...}`` and ``Retry-After``;
its clients back off on that (ccxt's ``RateLimitExceeded``). pushd does the same, so that one
client polling REST in a loop cannot take the HTTP port from the others. The weights are
Binance's (``WEIGHTS``, from its spot and USD-M REST docs).

Each address has a token bucket holding a minute's worth (``binance.rest_weight_per_minute``,
0: no budget) refilled evenly, spot and USD-M together (Binance counts them apart, 6,000 and
2,400 a minute); a request takes its weight, and the *used weight* is what the bucket lacks of
full (what was taken and not refilled yet, so at most the limit). A request heavier than the
whole budget takes the whole of it (it waits for a full bucket rather than for ever). The
table of addresses is bounded (``MAX_ADDRESSES``): past it the least recently seen address is
forgotten, and comes back with a full bucket (lenient, never wrong the other way).

WebSocket: a request costs one of the connection's message tokens (``[limits]``
``messages_per_second``, ``message_burst``), and a ``SUBSCRIBE`` or ``UNSUBSCRIBE`` one more per
``STREAMS_PER_TOKEN`` names beyond the first hundred (``message_cost``): a 1,024-stream
SUBSCRIBE costs 11, so a client repeating it is closed for its message rate (4001) within the
burst, as Binance closes a connection past its message rate, while ccxt's burst of single
SUBSCRIBEs at start costs one each.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

import msgspec

from pushd.binance.streams import Market
from pushd.gateway.ratelimit import TokenBucket

MAX_ADDRESSES = 10_000
STREAMS_PER_TOKEN = 100

Params = Mapping[str, str]
Weight = Callable[[Params], int]


def message_cost(streams: int) -> int:
    """A WebSocket request's message tokens: one, and one per ``STREAMS_PER_TOKEN`` stream names
    after the first ``STREAMS_PER_TOKEN``."""
    return max(1, math.ceil(streams / STREAMS_PER_TOKEN))


def _fixed(weight: int) -> Weight:
    return lambda _params: weight


def _by_symbol(one: int, every: int) -> Weight:
    """One symbol's answer, or every symbol's when ``symbol`` is left out."""
    return lambda params: one if "symbol" in params else every


def _by_limit(default: int, steps: tuple[tuple[int, int], ...]) -> Weight:
    """By ``limit`` (``default`` when absent or unreadable): the weight of the first step whose
    bound it does not pass, else the last step's."""

    def weigh(params: Params) -> int:
        text = params.get("limit", "")
        limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else default
        return next((weight for most, weight in steps if limit <= most), steps[-1][1])

    return weigh


WEIGHTS: dict[tuple[Market, str], Weight] = {
    ("spot", "ping"): _fixed(1), ("spot", "time"): _fixed(1),
    ("spot", "exchangeInfo"): _fixed(20),
    ("spot", "depth"): _by_limit(100, ((100, 5), (500, 25), (1000, 50), (5000, 250))),
    ("spot", "trades"): _fixed(25), ("spot", "aggTrades"): _fixed(4),
    ("spot", "klines"): _fixed(2),
    ("spot", "ticker/24hr"): _by_symbol(2, 80), ("spot", "ticker/bookTicker"): _by_symbol(2, 4),
    ("futures", "ping"): _fixed(1), ("futures", "time"): _fixed(1),
    ("futures", "exchangeInfo"): _fixed(1),
    ("futures", "depth"): _by_limit(500, ((50, 2), (100, 5), (500, 10), (1000, 20))),
    ("futures", "trades"): _fixed(5), ("futures", "aggTrades"): _fixed(20),
    ("futures", "klines"): _by_limit(500, ((99, 1), (499, 2), (1000, 5), (1500, 10))),
    ("futures", "ticker/24hr"): _by_symbol(1, 40),
    ("futures", "ticker/bookTicker"): _by_symbol(2, 5),
    ("futures", "premiumIndex"): _by_symbol(1, 10),
}  # fmt: skip


def weight(market: Market, route: str, params: Params) -> int:
    """The request weight of ``route`` (``"depth"``, ``"ticker/24hr"``, ...) with ``params``."""
    return WEIGHTS[(market, route)](params)


class Charge(msgspec.Struct, frozen=True):
    """A request's charge: the weight the address has used after it (None: no budget) and,
    when it was refused, the seconds after which it would pass (``Retry-After``)."""

    used: int | None = None
    retry_after: int | None = None


class RestBudget:
    __slots__ = ("_buckets", "_per_minute")

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def per_minute(self) -> int:
        return self._per_minute

    def retune(self, per_minute: int) -> None:
        """A reload's budget: every address starts again from a full bucket."""
        if per_minute != self._per_minute:
            self._per_minute = per_minute
            self._buckets.clear()

    def take(self, address: str, now: float, weight: int = 1) -> Charge:
        """Charge a request of ``weight`` to ``address`` (see the module docstring)."""
        if self._per_minute <= 0:
            return Charge()
        rate = self._per_minute / 60
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(rate, self._per_minute, now)
            if len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        cost = min(weight, self._per_minute)  # what the bucket takes (``TokenBucket.take``)
        taken = bucket.take(now, cost)
        held = bucket.tokens(now)
        used = math.ceil(self._per_minute - held)
        if taken:
            return Charge(used)
        return Charge(used, max(1, math.ceil((cost - held) / rate)))
