"""Durations counted by bucket as they happen, for a metric read later: a bisect and two
additions per observation, no dependency, nothing kept per observation."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    """Upper bounds of the buckets (seconds), ascending; one more bucket above the last."""
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of values <= le)`` for each bound and ``+Inf``, as Prometheus
        exposes a histogram."""
        bounds = [*(f"{b:g}" for b in self.bounds), "+Inf"]
        return list(zip(bounds, map(float, itertools.accumulate(self.counts)), strict=True))
