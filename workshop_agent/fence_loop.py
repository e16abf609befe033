"""A node that fences itself again and again for lateness, and which setting to change.

A fence for lateness (the lease, or the term beat, not confirmed before its fence point)
is right every time: the node cannot know whether its term still stands. But when etcd
did answer, only late, the node takes its own leader key up again and restarts its
services, and the next late answer fences it again: a loop that restarts the plant's
services for nothing, which repeated ``fenced`` lines alone do not explain. ``LOOP``
such fences within ``WINDOW_S`` are a loop: the agent says so once, with what made it
late (:func:`advice`), as an error line, an event and a problem in the node's status,
which stays until ``WINDOW_S`` passes with fewer fences.

What was late tells the setting apart. Requests go out every interval, so each answer
must come within the fence less one interval (the *budget*); each figure is the slowest
of the last minute (``shared/slowest.py``), and takes the blame from half the budget:

- the agent's own loop woke late: the server gives the agent no CPU in time (real-time
  priority, or a lighter load);
- etcd's answers came late: the pair's timings do not fit the distance to etcd (longer
  ones, whose budget holds twice the slowest answer);
- neither: etcd left requests unanswered, a stall longer than the fence (a peer path,
  whose promises hold the pair through stalls, or etcd's own disk and load).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from hapair.shared.clock import Clock
from hapair.shared.log import EventLog
from hapair.shared.topology import Failover, TermBeat

LOOP = 3
WINDOW_S = 600.0
LONGEST_TTL_S = 60  # failover.lease_ttl_s's bound
LONGEST_FENCE_MS = 10000  # failover.term_beat.fence_ms's
HEADROOM = 2.0  # the slowest answer of a minute, times this, within the budget

Lateness = Literal["lease", "term beat"]


@dataclass(frozen=True)
class Figures:
    """What a fence of ``kind`` had to fit in, and how late things were lately."""

    kind: Lateness
    fence_s: float
    """From the send of the last confirmed keepalive (or beat) to the fence."""
    interval_s: float
    """Between two keepalives (or beats)."""
    round_trip_s: float | None
    """The slowest answer of etcd to a keepalive (or beat) lately; None: none answered."""
    lag_s: float | None
    """How late the agent's loop that sends them woke up, at worst lately."""

    @property
    def budget_s(self) -> float:
        """How long an answer may take: the next request goes out an interval later."""
        return self.fence_s - self.interval_s


def advice(fig: Figures, failover: Failover, peer_path: bool, realtime: bool) -> str:
    """What made the node late, and the setting to change, in one sentence or two."""
    half = fig.budget_s / 2
    budget = f"{_ms(fig.budget_s)} (the fence of {_ms(fig.fence_s)} less an interval)"
    if fig.lag_s is not None and fig.lag_s >= half:
        told = f"this agent's own loop woke up to {_ms(fig.lag_s)} late, of {budget}"
        if not realtime:
            return (
                f"{told}: the server is too busy for it; run the agent at real-time priority "
                "(--realtime-priority, HAPAIR_REALTIME_PRIORITY; it is off or refused here)"
            )
        return f"{told}, at real-time priority: lighten the server's load, or {_longer(fig)}"
    if fig.round_trip_s is not None and fig.round_trip_s >= half:
        told = f"etcd answered in up to {_ms(fig.round_trip_s)}, of {budget}"
        return f"{told}: {_fitting(fig.kind, fig.round_trip_s, failover)}"
    answered = _ms(fig.round_trip_s) if fig.round_trip_s is not None else "-"
    told = f"etcd left requests unanswered past the fence (its answers came in up to {answered})"
    if not peer_path:
        return (
            f"{told}: give the pair a peer path (its network section), whose promises hold "
            "it through etcd's stalls, and look at etcd's disk and load"
        )
    return (
        f"{told}, and the peers' promises did not cover it: look at etcd's disk and load, "
        f"and at the peer path; or {_longer(fig)}"
    )


def _fitting(kind: Lateness, round_trip_s: float, failover: Failover) -> str:
    """Timings whose budget holds ``HEADROOM`` of these round trips."""
    if kind == "term beat":
        # A quarter of the fence between beats: the budget is three quarters of it.
        now = failover.term_beat or TermBeat()
        fitting = 50 * math.ceil(HEADROOM * round_trip_s * 1000 * 4 / 3 / 50)
        fence_ms = max(fitting, now.fence_ms + 50)
        interval_ms = 10 * math.ceil(fence_ms / 4 / 10)
        if 2 * fence_ms / 1000 >= failover.fence_after_s or fence_ms > LONGEST_FENCE_MS:
            return (
                "no term beat fits at this distance below the lease's own fence point: "
                "leave failover.term_beat out, the lease alone is as fast"
            )
        return (
            f"set failover.term_beat to interval_ms {interval_ms}, fence_ms {fence_ms}, "
            f"margin_ms {fence_ms}, or a longer fence"
        )
    # Keepalives go out every ttl/4, the fence is ttl - margin after a send: the budget
    # is three quarters of the TTL less the margin.
    margin = failover.fence_margin_s
    needed = math.ceil((HEADROOM * round_trip_s + margin) * 4 / 3)
    ttl = min(LONGEST_TTL_S, max(failover.lease_ttl_s + 1, needed))
    return f"raise failover.lease_ttl_s (now {failover.lease_ttl_s:g}) to {ttl:g}"


def _longer(fig: Figures) -> str:
    if fig.kind == "term beat":
        return "lengthen failover.term_beat's fence_ms and margin_ms"
    return "raise failover.lease_ttl_s"


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)} ms"


class FenceLoop:
    """Counts this node's fences for lateness (``late``); ``problem`` while in a loop.

    ``figures`` gives, for a kind, what its fence had to fit in and how late things
    were; ``settings`` the pair's failover settings and whether it has a peer path;
    ``realtime`` whether the agent's loop runs at real-time priority now; ``dirty``
    has the status published again once the loop is over."""

    def __init__(
        self,
        clock: Clock,
        log: EventLog,
        *,
        figures: Callable[[Lateness], Figures],
        settings: Callable[[], tuple[Failover, bool]],
        realtime: Callable[[], bool],
        event: Callable[..., None],
        dirty: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.log = log
        self._figures = figures
        self._settings = settings
        self._realtime = realtime
        self._event = event
        self._dirty = dirty
        self._fences: deque[float] = deque()
        self._advice: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def late(self, kind: Lateness) -> None:
        """This node fenced itself: ``kind`` was not confirmed before its fence point."""
        now = self.clock()
        self._fences.append(now)
        self._forget(now)
        if len(self._fences) < LOOP:
            return
        failover, peer_path = self._settings()
        said = advice(self._figures(kind), failover, peer_path, self._realtime())
        if self._advice is None:
            self.log.error(
                "fencing itself in a loop: its services restart for nothing",
                kind=kind,
                fences=len(self._fences),
                within_s=round(now - self._fences[0], 1),
                advice=said,
            )
            self._event("fence_loop", said, late=kind, fences=len(self._fences))
        self._advice = said
        self._dirty()
        self._arm(now)

    @property
    def looping(self) -> bool:
        return self._advice is not None

    def problem(self) -> str | None:
        if self._advice is None:
            return None
        return (
            f"fencing itself in a loop ({len(self._fences)} fences within "
            f"{WINDOW_S / 60:g} min): {self._advice}"
        )

    def _arm(self, now: float) -> None:
        """Look again once the oldest of the last ``LOOP`` fences leaves the window."""
        if self._timer is not None:
            self._timer.cancel()
        over_at = self._fences[-LOOP] + WINDOW_S
        self._timer = asyncio.get_running_loop().call_later(max(0.0, over_at - now), self._over)

    def _forget(self, now: float) -> None:
        while self._fences and self._fences[0] <= now - WINDOW_S:
            self._fences.popleft()

    def _over(self) -> None:
        self._timer = None
        now = self.clock()
        self._forget(now)
        if len(self._fences) >= LOOP:
            self._arm(now)  # woken a little early
        elif self._advice is not None:
            self._advice = None
            self.log.info("no longer fencing itself in a loop")
            self._dirty()
