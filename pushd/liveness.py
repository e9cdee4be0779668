"""Which children of ``pushd run --workers`` have stopped beating, decided without I/O.

Each child's event loop sends ``WATCHDOG=1`` to the supervisor every half ``workers.watchdog_s``
(systemd's watchdog protocol, over the supervisor's relay socket), so a child whose loop stops
turning (stopped, deadlocked, spinning in one callback) falls silent. A process that exits is
seen by its parent at once; a process that hangs is seen only this way. A child is watched
from its first beat (``READY=1`` counts as one): how long a start may take is not this rule's
business, and a child that never got going has no clients to lose.
"""

from __future__ import annotations

import msgspec


class Beats:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last: dict[str, float] = {}  # child -> when it last beat

    def beat(self, child: str, now: float) -> None:
        self._last[child] = now

    def forget(self, child: str) -> None:
        """The child exited: its successor is watched from its own first beat."""
        self._last.pop(child, None)

    def overdue(self, now: float) -> list[tuple[str, float]]:
        """Children silent for ``timeout_s`` or longer, with their silence; each is reported
        once (then forgotten: it is about to be replaced)."""
        late = [(child, now - last) for child, last in self._last.items()
                if now - last >= self.timeout_s]  # fmt: skip
        for child, _ in late:
            del self._last[child]
        return late

    def next_check(self, now: float) -> float:
        """When a child may next be overdue. A child first heard from after ``now`` is
        overdue no earlier than ``now + timeout_s``, so sleeping until this misses none."""
        return min((last + self.timeout_s for last in self._last.values()),
                   default=now + self.timeout_s)  # fmt: skip


# what a supervisor puts in its children's environment
LIFELINE_VARIABLE = "PUSHD_LIFELINE_FD"  # the lifeline's read end: end-of-file, supervisor gone
REPORT_VARIABLE = "PUSHD_SUPERVISOR_REPORT"  # the compute child: the report file to export
REASONS = ("exited", "hung")  # why a child was replaced: it ended, or it stopped beating


class Report(msgspec.Struct, frozen=True):
    """The supervisor's counts, in a file it replaces whole: the supervisor has no HTTP port,
    so its compute child (``http.port``) exports them on ``/metrics``."""

    replaced: dict[str, dict[str, int]]  # child -> reason -> children replaced
