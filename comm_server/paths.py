"""Which network path to a PLC is in use, and how each path is doing. Pure: the clock
is passed in, nothing here waits or talks to a network.

The first path is the primary. A poll goes to the path in use; when it fails, the
other path is tried at once, in the same poll, and becomes the path in use if it
answers. The path not in use is probed every ``probe_interval_s``, so its state is
known before it is needed. After a switch to the backup, the poller goes back to the
primary once the primary has answered every probe for ``failback_after_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hapair.shared.plcs import PathHealth


@dataclass
class PathState:
    """What the poller tracks of one path; :meth:`report` gives what it publishes."""

    endpoint: str
    up: bool | None = None  # None: not tried yet
    changed_at: float = 0.0  # monotonic time of the last up/down change
    up_since: float | None = None
    checked_at: float = -math.inf  # last poll or probe on this path
    latency_ms: float | None = None  # smoothed round trip of one request
    errors: int = 0
    last_error: str = ""

    def report(self) -> PathHealth:
        return PathHealth(
            endpoint=self.endpoint,
            up=self.up,
            latency_ms=None if self.latency_ms is None else round(self.latency_ms, 2),
            errors=self.errors,
            last_error=self.last_error or None,
        )


class PathSwitch:
    def __init__(self, endpoints: list[str], failback_after_s: float, probe_interval_s: float):
        self.paths = [PathState(e) for e in endpoints]
        self.current = 0
        self.failback_after_s = failback_after_s
        self.probe_interval_s = probe_interval_s

    @property
    def in_use(self) -> PathState:
        return self.paths[self.current]

    def name(self, index: int) -> str:
        role = "primary" if index == 0 else "backup"
        return f"{role} {self.paths[index].endpoint}"

    def attempt_order(self) -> list[int]:
        """The path in use first, then the others: a poll tries them in this order."""
        return [self.current, *(i for i in range(len(self.paths)) if i != self.current)]

    def succeeded(self, index: int, latency_s: float, now: float) -> bool:
        """Record an answer; True if the path was not up before."""
        path = self.paths[index]
        path.checked_at = now
        ms = latency_s * 1000
        path.latency_ms = ms if path.latency_ms is None else 0.8 * path.latency_ms + 0.2 * ms
        if path.up:
            return False
        path.up, path.changed_at, path.up_since = True, now, now
        return True

    def failed(self, index: int, error: str, now: float) -> bool:
        """Record a failure; True if the path was not down before."""
        path = self.paths[index]
        path.checked_at = now
        path.errors += 1
        path.last_error = error
        if path.up is False:
            return False
        path.up, path.changed_at, path.up_since = False, now, None
        return True

    def use(self, index: int) -> int:
        """Switch to ``index``; returns the path used before."""
        before, self.current = self.current, index
        return before

    def failback_due(self, now: float) -> bool:
        primary = self.paths[0]
        return (
            self.current != 0
            and primary.up is True
            and primary.up_since is not None
            and now - primary.up_since >= self.failback_after_s
        )

    def probes_due(self, now: float) -> list[int]:
        return [
            i
            for i, p in enumerate(self.paths)
            if i != self.current and now - p.checked_at >= self.probe_interval_s
        ]

    @property
    def all_up(self) -> bool:
        return all(p.up for p in self.paths)
