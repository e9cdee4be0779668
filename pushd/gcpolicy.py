"""The cyclic garbage collector, set for a process that serves: call ``settle`` once started.

CPython's full (generation 2) collection stops the whole process for as long as it takes to
walk every container object alive: a daemon just started walks ~90,000 objects of modules,
classes, config and routes (45-60 ms here), and every connection adds a few hundred (at 10,000
idle connections, 300-500 ms; BENCHMARKS.md, issue 22). Every connection's frames wait that
long. A full collection comes once ten collections of generation 1 have run and the objects
that survived them have grown by a quarter since the last: while connections pile up, every
few thousand connects.

``settle`` moves everything alive once the daemon is built into the permanent generation
(``gc.freeze``: the startup objects are never garbage, so they are never walked again), and
makes the young collections rarer (``YOUNG_THRESHOLD`` new container objects, not CPython's
700: a connect allocates a few hundred), which spaces the full ones ~14x further apart too.
Cyclic garbage is still found: a connection that ended leaves its objects in cycles (~28:
trio's task, nursery and scope, its session, its outlet; its buffers are freed at close), which
the older generations' collections free. Frozen objects are still freed when their last
reference goes (a reload's replaced config); only a cycle among them would stay for good.

``Pauses`` times every collection (``gc.callbacks``) for ``/metrics``
(``pushd_gc_pause_seconds{generation}``). Only the process's own entry point (``pushd run``)
calls ``settle``, never a test run: what is alive there when it is called would never be freed.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Callable
from typing import Any

YOUNG_THRESHOLD = 10_000  # new container objects between two young collections (CPython: 700)
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Pauses:
    """How long each collection stopped the process, by generation (a ``gc.callbacks`` hook:
    called with ``"start"`` and ``"stop"`` around every collection). No I/O."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self.sums = [0.0, 0.0, 0.0]
        self._buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        took = self._clock() - self._started
        generation = info["generation"]
        self.sums[generation] += took
        self._buckets[generation][bisect.bisect_left(PAUSE_BUCKETS, took)] += 1

    def cumulative(self, generation: int) -> list[tuple[float, int]]:
        """(upper bound, collections that took at most that), the last bound infinite."""
        out, total = [], 0
        bounds = (*PAUSE_BUCKETS, float("inf"))
        for bound, count in zip(bounds, self._buckets[generation], strict=True):
            total += count
            out.append((bound, total))
        return out


PAUSES: Pauses | None = None  # set by ``settle``: this process times its collections


def settle() -> None:
    """Time every collection from now on, collect once, then freeze what is alive and space
    the young collections."""
    global PAUSES
    if PAUSES is None:
        PAUSES = Pauses()
        gc.callbacks.append(PAUSES)
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
