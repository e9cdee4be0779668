"""Token bucket, and what a connection's received frames cost it; fed the clock by the caller
(no I/O, no clock of its own)."""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module for its defaults
    from pushd.config import LimitsConfig


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

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens (one request, or a heavier one), at most the whole bucket: a
        request heavier than the burst still passes a full bucket, and empties it; False (and
        nothing taken) when the bucket holds fewer."""
        self._refill(now)
        cost = min(cost, self._burst)
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    def tokens(self, now: float) -> float:
        """The tokens the bucket holds now."""
        self._refill(now)
        return self._tokens


# What a connection's inbound frames may cost it (defaults of the [limits] keys of these names).
FRAMES_PER_SECOND = 100.0  # frames/s: every opcode, and reads that complete no frame
FRAME_BURST = 200  # frames, taken at once after a quiet spell
MAX_FRAGMENTS_PER_MESSAGE = 32  # frames of one message (a message is at most 4 KiB by default)
MESSAGE_TIMEOUT_S = 10.0  # seconds from a message's first byte to its last frame
MAX_PONGS_OWED = 8  # pong frames queued and not yet written; past it only the latest is owed


class Breach(enum.Enum):
    """Why a connection's frames end it; the value is the metric's reason label."""

    FRAME_RATE = "frame_rate"
    FRAGMENTS = "too_many_fragments"
    MESSAGE_TIMEOUT = "message_timeout"


class FrameBudget:
    """Every frame a client sends costs it, whatever its opcode: control frames are as cheap
    to send and as dear to parse as data. One token per frame (a data frame that arrives in
    pieces costs one per piece; a read that completes no frame costs one, so a frame dribbled
    in tiny TCP segments pays per segment); a message may take ``max_fragments_per_message`` frames
    and ``message_timeout_s`` from its first byte to its last."""

    __slots__ = ("_bucket", "_fragments", "_max_fragments", "_message_timeout_s", "deadline")

    def __init__(self, limits: LimitsConfig, now: float) -> None:
        self._bucket = TokenBucket(limits.frames_per_second, limits.frame_burst, now)
        self._max_fragments = limits.max_fragments_per_message
        self._message_timeout_s = limits.message_timeout_s
        self._fragments = 0  # frames of the message under way
        self.deadline = math.inf  # when the message under way must be finished

    def retune(self, limits: LimitsConfig) -> None:
        """A reload's limits (a message under way keeps its deadline)."""
        self._bucket.retune(limits.frames_per_second, limits.frame_burst)
        self._max_fragments = limits.max_fragments_per_message
        self._message_timeout_s = limits.message_timeout_s

    def frame(self, now: float) -> Breach | None:
        """One control frame, one piece of a data frame, or one read that completed none."""
        return None if self._bucket.take(now) else Breach.FRAME_RATE

    def data(self, now: float, *, frame_finished: bool, message_finished: bool) -> Breach | None:
        """One piece of a data frame (charged as a frame, too); counts the message's frames."""
        if not self._bucket.take(now):
            return Breach.FRAME_RATE
        if self.deadline == math.inf:
            self.deadline = now + self._message_timeout_s
        if message_finished:
            self._fragments = 0
            self.deadline = math.inf
        elif frame_finished:
            self._fragments += 1
            if self._fragments >= self._max_fragments:  # the next would be one too many
                return Breach.FRAGMENTS
        return self.overdue(now)

    def overdue(self, now: float) -> Breach | None:
        """MESSAGE_TIMEOUT once the message under way is past its deadline."""
        return Breach.MESSAGE_TIMEOUT if now >= self.deadline else None

    def abandon(self) -> None:
        """The message under way will not be read on (the connection is closing)."""
        self._fragments = 0
        self.deadline = math.inf
