"""The clock of every fence and watchdog deadline: ``CLOCK_BOOTTIME``.

``CLOCK_MONOTONIC`` stops while the machine is suspended (a paused virtual machine, a host
asleep), so a deadline on it would pass only that long after the resume: an agent and a
watchdog resumed after a suspend longer than the lease would go on running services
that another node has taken over meanwhile. ``CLOCK_BOOTTIME`` counts the suspended
time too; like ``CLOCK_MONOTONIC`` it never jumps with the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

PAST_DUE_S = 0.001
"""How far past a due instant a wait ends, so that the clock then reads past it (a
timer may fire a hair early)."""


def boottime() -> float:
    """Seconds since boot, suspended time included."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
