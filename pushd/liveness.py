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
    def __init__(self, timeout_s: float, stop_grace_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.stop_grace_s = stop_grace_s
        self._last: dict[str, float] = {}  # child -> when it last beat
        self._stopping: dict[str, float] = {}  # child -> until when its silence is allowed

    def beat(self, child: str, now: float) -> None:
        self._last[child] = now

    def stopping(self, child: str, now: float) -> None:
        """The child said STOPPING=1: it drains, then its loop ends and the interpreter exits,
        silently, in seconds on a busy machine. Silence is allowed until ``stop_grace_s``
        after this (as systemd's ``TimeoutStopSec`` replaces the watchdog while a unit
        stops); a child still there then is hung in its shutdown."""
        self._last.setdefault(child, now)
        self._stopping[child] = now + self.stop_grace_s

    def forget(self, child: str) -> None:
        """The child exited: its successor is watched from its own first beat."""
        self._last.pop(child, None)
        self._stopping.pop(child, None)

    def _deadline(self, child: str) -> float:
        return max(self._last[child] + self.timeout_s, self._stopping.get(child, 0.0))

    def overdue(self, now: float) -> list[tuple[str, float]]:
        """Children silent past their deadline, with their silence; each is reported once
        (then forgotten: it is about to be replaced)."""
        late = [(child, now - last) for child, last in self._last.items()
                if now >= self._deadline(child)]  # fmt: skip
        for child, _ in late:
            self.forget(child)
        return late

    def next_check(self, now: float) -> float:
        """When a child may next be overdue. A child first heard from after ``now`` is
        overdue no earlier than ``now + timeout_s``, so sleeping until this misses none."""
        return min(map(self._deadline, self._last), default=now + self.timeout_s)


# what a supervisor puts in its children's environment
LIFELINE_VARIABLE = "PUSHD_LIFELINE_FD"  # the lifeline's read end: end-of-file, supervisor gone
REPORT_VARIABLE = "PUSHD_SUPERVISOR_REPORT"  # the compute child: the report file to export
REASONS = ("exited", "hung")  # why a child was replaced: it ended, or it stopped beating


class Report(msgspec.Struct, frozen=True):
    """The supervisor's counts, in a file it replaces whole: the supervisor has no HTTP port,
    so its compute child (``http.port``) exports them on ``/metrics``."""

    replaced: dict[str, dict[str, int]]  # child -> reason -> children replaced
