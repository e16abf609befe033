"""The slowest of recent durations: what fences a node is its slowest moment, not its
median, and a histogram since the start forgets when its slow values came."""

from __future__ import annotations

import asyncio
from collections import deque

from hapair.shared.clock import Clock

SPAN_S = 60.0


class Slowest:
    """The largest value noted within the last ``span_s`` seconds (``at`` on the caller's
    clock); at most ``keep`` values are kept, the oldest dropped first."""

    def __init__(self, span_s: float = SPAN_S, keep: int = 2048) -> None:
        self.span_s = span_s
        self._noted: deque[tuple[float, float]] = deque(maxlen=keep)

    def note(self, at: float, value: float) -> None:
        self._noted.append((at, value))

    def worst(self, now: float) -> float | None:
        """None: nothing noted within the span."""
        while self._noted and self._noted[0][0] < now - self.span_s:
            self._noted.popleft()
        return max((value for _, value in self._noted), default=None)


async def late_wake(at: float, clock: Clock, lag: Slowest) -> None:
    """Sleep until ``at`` on ``clock``; note in ``lag`` how much later the loop woke up
    (a busy server, a busy loop). Only the sleep counts: time spent awaiting etcd before
    it is etcd's, not the loop's."""
    asleep = clock()
    await asyncio.sleep(max(0.0, at - asleep))
    woke = clock()
    lag.note(woke, max(0.0, woke - max(at, asleep)))
