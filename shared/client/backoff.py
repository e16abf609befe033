"""Bounded exponential back-off with jitter, as a pure sequence of delays."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays from ``initial_s``, multiplied by ``factor`` each time, capped at
    ``max_s``; each one is cut by a random fraction up to ``jitter`` so that clients
    that lost the same server do not all come back in step.

    Waits built on it end early when a newer endpoint is published: back-off paces
    retries of one endpoint, it never delays a move to a new one.
    """

    initial_s: float = 0.05
    max_s: float = 2.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("back-off needs 0 < initial_s <= max_s")
        if self.factor < 1:
            raise ValueError("back-off factor must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("back-off jitter must be in [0, 1)")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """An endless sequence of delays; each in ``[base * (1 - jitter), base]``."""
        draw = (rng or random.Random()).random
        base = self.initial_s
        while True:
            yield base * (1.0 - self.jitter * draw())
            base = min(self.max_s, base * self.factor)
