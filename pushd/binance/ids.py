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
"""

from __future__ import annotations

from pushd.bus.model import epoch_ms

MAX_SAFE = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER


def update_id(epoch: str, seq: int) -> int:
    """The dialect's update id of a depth channel's event ``seq`` in ``epoch``."""
    return epoch_ms(epoch) * 1000 + seq
