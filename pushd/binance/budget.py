"""The Binance REST routes' request budget per client address (sans-IO: the caller gives the
clock). Binance answers an address past its limit with 429, ``{"code":-1003,...}`` and
``Retry-After``, and its clients back off on that (ccxt's ``RateLimitExceeded``); pushd does the
same, so that one client polling REST in a loop cannot take the HTTP port from the others.

Each address has a token bucket holding a minute's worth (``binance.rest_requests_per_minute``,
0: no budget) and refilled evenly; every Binance REST request takes one. The table of addresses
is bounded (``MAX_ADDRESSES``): past it the least recently seen address is forgotten, and comes
back with a full bucket (lenient, never wrong the other way).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from pushd.gateway.ratelimit import TokenBucket

MAX_ADDRESSES = 10_000


class RestBudget:
    __slots__ = ("_buckets", "_per_minute")

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def retune(self, per_minute: int) -> None:
        """A reload's budget: every address starts again from a full bucket."""
        if per_minute != self._per_minute:
            self._per_minute = per_minute
            self._buckets.clear()

    def take(self, address: str, now: float) -> int | None:
        """Charge one request to ``address``; None when it may go on, else the seconds after
        which the next one will (``Retry-After``)."""
        if self._per_minute <= 0:
            return None
        rate = self._per_minute / 60
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(rate, self._per_minute, now)
            if len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        if bucket.take(now):
            return None
        return max(1, math.ceil(1 / rate))  # an empty bucket has less than one token
