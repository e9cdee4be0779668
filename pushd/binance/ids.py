"""The Binance dialect's depth update ids: rising for ever, across restarts and epochs. No I/O.

``update_id(epoch, seq) = epoch_ms(epoch) * 1000 + seq``, where ``seq`` is the depth channel's
bus seq (the same on every node; one more per event) and ``epoch_ms`` the epoch's start time
(``pushd.bus.model.new_epoch`` writes it first). So:

- within an epoch the id rises by exactly one per depth event: spot's ``U = previous u + 1``
  and USD-M's ``pu = previous u`` hold, and an event this node never got (a bus loss), or one
  the dialect does not send (pushd's mid-stream snapshot after an engine resync), is a visible
  break in that chain: the client fetches REST depth again, as Binance's own docs say;
- a new epoch (a restart, Redis losing the channel) starts above every id of the previous one
  as long as the old epoch's seq stayed below 1000 x the ms between the two epochs' starts --
  a depth channel publishes at most 100 events a second (``depth_interval_ms`` >= 10), so
  0.1 per ms against 1,000 per ms;
- it stays below 2**53 (a JavaScript client's exact integers) until epoch_ms reaches about
  9.0e12, the year 2255 (``MAX_SAFE``).

An epoch of the old random form reads as time 0: its ids are small, and the next epoch (time
prefixed) is above them.

An epoch that says it began more than a day after this host's clock (``MAX_EPOCH_AHEAD_MS``:
a node with a clock far ahead made it, or someone wrote it into Redis) is refused
(``EpochGuard``): its ids would be above those of every correct epoch after it until the clocks
caught up, and ccxt would drop all of those. The dialect sends no event of a refused epoch and
REST depth answers -1001 for it; when a correct epoch comes its ids do not continue the last
ones a client holds (a visible break: it fetches REST depth again). A day of tolerance, so that
the skew between nodes' clocks (seconds) never refuses a correct epoch.
"""

from __future__ import annotations

from pushd.bus.model import epoch_ms

MAX_SAFE = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
MAX_EPOCH_AHEAD_MS = 86_400_000  # an epoch starting later than this after our clock: refused
MAX_EPOCHS_KEPT = 1024  # epochs remembered (trusted, refused): one per depth channel, bounded


def update_id(epoch: str, seq: int) -> int:
    """The dialect's update id of a depth channel's event ``seq`` in ``epoch``."""
    return epoch_ms(epoch) * 1000 + seq


def ahead_ms(epoch: str, now_ms: int) -> int:
    """How far past ``now_ms`` ``epoch`` says it began (negative: before)."""
    return epoch_ms(epoch) - now_ms


class EpochGuard:
    """Which epochs' update ids may be sent, by this host's clock (see the module docstring).

    An epoch admitted once stays admitted (the clock only moves on); one refused is judged
    again at each event, and reported once (``first_refusal``). Memory is bounded: past
    ``MAX_EPOCHS_KEPT`` the table starts again (an epoch is then judged, or reported, anew)."""

    __slots__ = ("_admitted", "_reported")

    def __init__(self) -> None:
        self._admitted: set[str] = set()
        self._reported: set[str] = set()

    def admits(self, epoch: str, now_ms: int) -> bool:
        if epoch in self._admitted:
            return True
        if ahead_ms(epoch, now_ms) > MAX_EPOCH_AHEAD_MS:
            return False
        if len(self._admitted) >= MAX_EPOCHS_KEPT:
            self._admitted.clear()
        self._admitted.add(epoch)
        return True

    def first_refusal(self, epoch: str) -> bool:
        """True the first time a refused ``epoch`` is reported (the caller logs it)."""
        if epoch in self._reported:
            return False
        if len(self._reported) >= MAX_EPOCHS_KEPT:
            self._reported.clear()
        self._reported.add(epoch)
        return True


EPOCHS = EpochGuard()  # the process's: the dialect's views and REST judge alike, report once
