"""Token bucket, fed the clock by its caller (no I/O, no clock of its own)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second refill a bucket of ``burst``; each request takes one."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now

    def retune(self, rate: float, burst: int) -> None:
        """New limits (a config reload); what the caller saved up is kept up to the burst."""
        self._rate = rate
        self._burst = float(burst)
        self._tokens = min(self._tokens, self._burst)

    def has_token(self, now: float) -> bool:
        """Whether a request could be taken now, without taking it."""
        self._refill(now)
        return self._tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
