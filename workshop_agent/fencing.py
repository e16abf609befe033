"""Fencing: until when this node may act as active, and the timer that stops it then.

The fence point is the lease session's (``shared/lease.py``), or the term beat's if
earlier (``term_beat.py``, when the pair beats), pushed later only by the peers' promises
while etcd cannot be reached (``hold.py``). A timer fires at that point and fences unless
the point moved meanwhile; the watchdog gets the point plus half the margin of the rule
that set it, should this process freeze. Everything is read on one injected clock, so
the rule can be checked on a fake one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from hapair.shared.clock import Clock
from hapair.shared.log import EventLog
from hapair.workshop_agent.fence_loop import Lateness
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.term_beat import BeatTiming, term_fence_point, watchdog_deadline


class Lease(Protocol):
    """What fencing reads of the lease session."""

    @property
    def lease(self) -> int | None: ...

    @property
    def fence_deadline(self) -> float: ...

    @property
    def fence_after(self) -> float: ...


class Beat(Protocol):
    """What fencing reads of the term's beats (``beating.py``)."""

    def fence_point(self, term: int | None) -> float: ...

    def timing(self, term: int | None) -> BeatTiming | None: ...


class NoBeat:
    """A pair that does not beat: only the lease and the holds set the point."""

    def fence_point(self, term: int | None) -> float:
        return float("inf")

    def timing(self, term: int | None) -> BeatTiming | None:
        return None


class Fencing:
    """The fence point, the fence timer and the fence itself.

    ``term`` gives the term this node holds now; ``end_term`` ends it and returns the
    term it ended; ``stop_active`` stops at once whatever serves as active (address,
    services, database); ``active_up`` says whether an active-only service still runs;
    ``hold_peers`` names the nodes whose promises a hold needs; ``late`` is told of each
    fence for lateness, and of what was late (``fence_loop.py``)."""

    def __init__(
        self,
        lease: Lease,
        ledger: Ledger,
        clock: Clock,
        log: EventLog,
        *,
        term: Callable[[], int | None],
        end_term: Callable[[], int | None],
        hold_peers: Callable[[], Iterable[str]],
        fence_margin: Callable[[], float],
        watchdog_deadline: Callable[[float], None],
        watchdog_lease: Callable[[int | None], None],
        active_up: Callable[[], bool],
        stop_active: Callable[[], None],
        event: Callable[..., None],
        changed: Callable[[], None],
        late: Callable[[Lateness], None] = lambda what: None,
    ) -> None:
        self.lease = lease
        self.ledger = ledger
        self.clock = clock
        self.log = log
        self._term = term
        self._end_term = end_term
        self._hold_peers = hold_peers
        self._fence_margin = fence_margin
        self._watchdog_deadline = watchdog_deadline
        self._watchdog_lease = watchdog_lease
        self._active_up = active_up
        self._stop_active = stop_active
        self._event = event
        self._changed = changed
        self._late = late
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = -float("inf")
        self.beat: Beat = NoBeat()
        self.fencing = False  # the services of a fence are still dying
        # The watchdog's deadline when the term was fenced: until its services are gone
        # it never moves later (its kill grace, half the lease's margin, may outlast the
        # beat's margin, within which the standby takes over).
        self._dying_deadline = float("inf")
        self.fences = 0  # since the agent started, for the metrics

    def point(self) -> float:
        """When this node must have stopped acting as active (``-inf``: it may not)."""
        return self._watched()[0]

    def loop_point(self) -> float:
        """The fence point the decision loop wakes for: the lease's and the holds'. The
        beat's would wake it at every beat for nothing; when it passes, the fence timer
        fences, which wakes the loop."""
        return max(self.lease.fence_deadline, self._hold_point(self._term()))

    def _hold_point(self, term: int | None) -> float:
        """Until when the peers' promises let this node act (``-inf``: they do not)."""
        s = self.lease
        if s.lease is not None and term is not None and self.ledger.epoch == term:
            return self.ledger.deadline(self._hold_peers(), s.fence_after)
        return -float("inf")

    def _watched(self) -> tuple[float, float]:
        """The fence point and the watchdog's deadline: each rule's point plus half of
        its own margin (the beat's for the beat, the pair's for the lease and the hold),
        combined as the point combines them."""
        s = self.lease
        term = self._term()
        hold = self._hold_point(term)
        beat = self.beat.fence_point(term)
        timing = self.beat.timing(term)
        point = term_fence_point(s.fence_deadline, beat, hold)
        if timing is None:
            watchdog = point + self._fence_margin() / 2
        else:
            watchdog = watchdog_deadline(s.fence_deadline, beat, hold, timing, self._fence_margin())
        if term is None and self.fencing:
            watchdog = min(watchdog, self._dying_deadline)
        return point, watchdog

    def valid(self, now: float) -> bool:
        """May this node act as active now: its lease confirmed, or, while etcd cannot
        be reached, every peer's promise not to campaign (``hold.py``)."""
        return self.lease.lease is not None and now < self.point()

    def may_run(self) -> bool:
        """Checked right before any active-only service is spawned."""
        return self._term() is not None and self.valid(self.clock())

    def run_until(self) -> float:
        """The fence point while this node holds its term and lease, else ``-inf``: an
        active-only service forked now must not start its program after it."""
        held = self._term() is not None and self.lease.lease is not None
        return self.point() if held else -float("inf")

    def lease_changed(self) -> None:
        """The fence point may have moved: set the timer and the watchdog to it. The
        watchdog learns the lease too, which it revokes once this agent is gone."""
        self._watchdog_lease(self.lease.lease)
        deadline, watchdog = self._watched()
        self._watchdog_deadline(watchdog)
        self._arm(deadline)
        if self.lease.lease is None:
            self.due()
        self._changed()

    def moved(self) -> None:
        """The fence point moved with nothing else to tell (a term beat acknowledged):
        only the watchdog and the timer follow it, twenty times a second. A timer set
        for an earlier instant stays: when it fires on a point that has moved on, it is
        set again (:meth:`due`), once per fence rather than once per beat."""
        deadline, watchdog = self._watched()
        self._watchdog_deadline(watchdog)
        if self._timer is not None and self._timer_at <= deadline:
            return
        self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        self.cancel()
        if deadline > -float("inf"):
            self._timer_at = deadline
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - self.clock()), self.due
            )

    def due(self) -> None:
        self.cancel()
        if self.valid(self.clock()):
            self._arm(self.point())  # the point moved on since the timer was set
            return
        if self._term() is not None or self._active_up():
            beat = self.beat.fence_point(self._term()) < self.lease.fence_deadline
            what: Lateness = "term beat" if beat else "lease"
            if self.fence(f"{what} not confirmed before the fence point"):
                self._late(what)

    def fence(self, reason: str) -> bool:
        """Fence now; False if this fence's services are still dying (nothing done)."""
        dying = self._watched()[1]
        was = self._end_term()
        if was is None and self.fencing:
            return False  # the services of this fence are still dying: once is enough
        self.fencing, self._dying_deadline = True, dying
        self.fences += 1
        self._stop_active()
        self.log.warning("fenced", reason=reason, epoch=was)
        self.log.bind(epoch=None)
        self._event("fence", reason, epoch=was)
        self._changed()
        return True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def settled(self) -> None:
        """No active-only service runs any more: a later fence is one of its own."""
        self.fencing, self._dying_deadline = False, float("inf")
