"""The fence point and the watchdog's deadline of a term that beats, on a fake clock: once
the beat's point has fenced the term, the watchdog keeps the beat's deadline for as long
as the fenced services may still run, whatever the lease says meanwhile.

A fence signals the services and kills them half the lease's fence margin later; the
beat's margin may be shorter, and a standby takes the term over ``fence_after + margin``
after its last beat (``term_beat.py``): only the watchdog's deadline, half the beat's
margin after its point, stops them in time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hapair.workshop_agent.term_beat import BeatTiming, beat_fence_point, watchdog_deadline
from tests.unit.test_fencing import FENCE_AFTER, MARGIN, TERM, FakeLease, Node, fencing

TIMING = BeatTiming(interval=0.05, fence_after=0.15, margin=0.15)


@dataclass
class FakeBeat:
    """The beats of the term ``TERM``, the last acknowledged sent at ``acked_send``."""

    acked_send: float

    def fence_point(self, term: int | None) -> float:
        return beat_fence_point(self.acked_send, TIMING) if term == TERM else float("inf")

    def timing(self, term: int | None) -> BeatTiming | None:
        return TIMING if term == TERM else None


async def test_the_watchdog_keeps_the_beats_deadline_while_the_fenced_services_die() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    f.beat = FakeBeat(acked_send=100.0)
    f.lease_changed()
    beat_deadline = watchdog_deadline(
        lease.fence_deadline, 100.0 + TIMING.fence_after, -float("inf"), TIMING, MARGIN
    )
    assert node.watchdog[-1] == pytest.approx(100.0 + TIMING.fence_after + TIMING.margin / 2)
    assert node.watchdog[-1] == pytest.approx(beat_deadline)
    node.now = f.point()
    f.due()  # the beat's point: fenced
    assert node.term is None and node.stops == 1
    node.up = True  # its services signalled, still dying
    # A keepalive acknowledged meanwhile, or the peers no longer asked to hold: the fence
    # point of a node without a term is the lease's, but the services of the fenced term
    # must still be dead by the beat's deadline.
    lease.acked_send = 100.1
    f.lease_changed()
    assert node.watchdog[-1] <= beat_deadline
    f.settled()
    node.up = False
    f.lease_changed()  # nothing of that term runs any more: the lease's deadline again
    assert node.watchdog[-1] == pytest.approx(100.1 + FENCE_AFTER + MARGIN / 2)
    f.cancel()
