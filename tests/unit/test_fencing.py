"""The fence point and the fence timer, on a fake clock: the lease's own point, moved
later only by every peer's promise of this term; a fence due exactly at the point."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from hapair.shared.log import EventLog
from hapair.workshop_agent.fencing import Fencing
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.peer_wire import HoldReply
from hapair.workshop_agent.term_beat import BeatTiming

FENCE_AFTER = 1.5
MARGIN = 0.5
TERM = 7


@dataclass
class FakeLease:
    lease: int | None = 1
    acked_send: float = 100.0
    fence_after: float = FENCE_AFTER

    @property
    def fence_deadline(self) -> float:
        return -float("inf") if self.lease is None else self.acked_send + self.fence_after


@dataclass
class Node:
    """What the agent gives fencing: a clock, a term, services, a watchdog."""

    now: float = 100.0
    term: int | None = TERM
    up: bool = True
    peers: frozenset[str] = frozenset({"b", "c"})
    watchdog: list[float] = field(default_factory=list)
    leases: list[int | None] = field(default_factory=list)  # as told to the watchdog
    stops: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)

    def end_term(self) -> int | None:
        was, self.term = self.term, None
        return was

    def stop(self) -> None:
        self.stops += 1
        self.up = False

    def event(self, kind: str, reason: str = "", **_: object) -> None:
        self.events.append((kind, reason))


def fencing(node: Node, lease: FakeLease, ledger: Ledger | None = None) -> Fencing:
    return Fencing(
        lease,
        ledger or Ledger(),
        lambda: node.now,
        EventLog("test"),
        term=lambda: node.term,
        end_term=node.end_term,
        hold_peers=lambda: node.peers,
        fence_margin=lambda: MARGIN,
        watchdog_deadline=node.watchdog.append,
        watchdog_lease=node.leases.append,
        active_up=lambda: node.up,
        stop_active=node.stop,
        event=node.event,
        changed=lambda: None,
    )


def promised(ledger: Ledger, sender: str, seq: int, at: float, epoch: int = TERM) -> None:
    ledger.sent(epoch, seq, at, 2.0)
    reply = HoldReply(sender=sender, to="a", seq=seq, epoch=epoch, promised=True, ttl=2.0)
    assert ledger.answer(reply)


def test_without_holds_the_point_is_the_leases() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    assert f.point() == pytest.approx(100.0 + FENCE_AFTER)
    assert f.valid(101.0) and f.may_run()
    assert not f.valid(100.0 + FENCE_AFTER)  # at the point itself: no longer
    assert f.run_until() == pytest.approx(100.0 + FENCE_AFTER)


def test_no_lease_no_term_nothing_may_run() -> None:
    node = Node(term=None)
    f = fencing(node, FakeLease())
    assert not f.may_run()
    assert f.run_until() == -float("inf")
    f = fencing(Node(), FakeLease(lease=None))
    assert f.point() == -float("inf") and not f.valid(0.0) and not f.may_run()


def test_every_peers_promise_moves_the_point_to_the_oldest_promised_send() -> None:
    node, lease, ledger = Node(), FakeLease(), Ledger()
    f = fencing(node, lease, ledger)
    promised(ledger, "b", 1, 101.0)
    assert f.point() == pytest.approx(100.0 + FENCE_AFTER)  # c has not promised
    promised(ledger, "c", 2, 101.2)
    assert f.point() == pytest.approx(101.0 + FENCE_AFTER)
    promised(ledger, "b", 3, 101.4)
    assert f.point() == pytest.approx(101.2 + FENCE_AFTER)


def test_promises_count_only_for_the_term_held_with_a_lease() -> None:
    node, lease, ledger = Node(), FakeLease(), Ledger()
    f = fencing(node, lease, ledger)
    promised(ledger, "b", 1, 101.0, epoch=TERM - 1)
    promised(ledger, "c", 2, 101.0, epoch=TERM - 1)
    assert f.point() == pytest.approx(100.0 + FENCE_AFTER)  # promises of another term
    ledger.clear()
    promised(ledger, "b", 1, 101.0)
    promised(ledger, "c", 2, 101.0)
    assert f.point() == pytest.approx(101.0 + FENCE_AFTER)
    node.term = None
    assert f.point() == pytest.approx(100.0 + FENCE_AFTER)
    node.term, lease.lease = TERM, None
    assert f.point() == -float("inf")


def test_a_fence_due_exactly_at_the_point_fences_once() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    node.now = f.point()
    f.due()
    assert node.term is None and node.stops == 1
    assert node.events == [("fence", "lease not confirmed before the fence point")]
    node.up = True  # its services still dying: a second fence is the same one
    f.due()
    f.fence("again")
    assert node.stops == 1
    f.settled()
    f.fence("a new one")
    assert node.stops == 2


async def test_a_fence_due_before_the_point_does_nothing() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    node.now = f.point() - 0.001
    f.due()
    assert node.term == TERM and node.stops == 0
    f.cancel()


BEAT = BeatTiming(0.05, 0.15, 0.15)


@dataclass
class FakeBeat:
    """A term that beats: its fence point 150 ms after the last acknowledged send."""

    acked_send: float = 100.0

    def fence_point(self, term: int | None) -> float:
        return self.acked_send + BEAT.fence_after if term == TERM else float("inf")

    def timing(self, term: int | None) -> BeatTiming | None:
        return BEAT if term == TERM else None


async def test_a_beating_term_fences_at_the_earlier_point_its_watchdog_soon_after() -> None:
    node, lease, beat = Node(), FakeLease(), FakeBeat(acked_send=100.2)
    f = fencing(node, lease)
    f.beat = beat
    assert f.point() == pytest.approx(100.35)  # the beat's, well before the lease's
    assert f.loop_point() == pytest.approx(100.0 + FENCE_AFTER)  # the loop's: the lease's
    f.moved()
    assert node.watchdog == [pytest.approx(100.35 + 0.15 / 2)]
    f.cancel()
    node.term = None
    assert f.run_until() == -float("inf")


async def test_beats_move_the_point_without_setting_the_timer_again_at_each_one() -> None:
    """The timer set for an earlier point stays; firing on a point that moved on, it is
    set again, and once the beats stop it fences at the last beat's point. (The timer's
    delay is reckoned on the fake clock when it is set, then runs in real time.)"""
    node, lease, beat = Node(), FakeLease(), FakeBeat()
    f = fencing(node, lease)
    f.beat = beat
    node.now = 100.149
    f.moved()  # set for the first point, 1 ms away
    timer = f._timer
    node.now = 100.15  # it fires at that point
    for _ in range(3):  # three beats acknowledged, 10 ms apart
        beat.acked_send += 0.01
        f.moved()
        assert f._timer is timer
    await asyncio.sleep(0.02)
    assert node.stops == 0 and node.term == TERM, "fenced on a point that had moved on"
    assert f._timer is not None and f._timer is not timer, "not set again"
    node.now = 100.181  # past the last beat's point, when that timer fires
    await asyncio.sleep(0.1)
    assert node.stops == 1 and node.term is None
    assert node.events == [("fence", "term beat not confirmed before the fence point")]


async def test_a_beat_point_earlier_than_the_timer_sets_the_timer_again() -> None:
    node, lease, beat = Node(), FakeLease(), FakeBeat()
    f = fencing(node, lease)
    node.now = 100.1
    f.lease_changed()  # no beat yet: the timer is for the lease's point
    f.beat = beat
    f.moved()
    node.now = 100.15
    await asyncio.sleep(0.1)
    assert node.stops == 1, "the beat's point passed while the timer waited for the lease's"


async def test_the_timer_fires_at_the_point_and_the_watchdog_half_a_margin_later() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    node.now = f.point() - 0.05  # the fake clock says the point is 50 ms away
    f.lease_changed()
    assert node.watchdog == [pytest.approx(100.0 + FENCE_AFTER + MARGIN / 2)]
    node.now = f.point()
    await asyncio.sleep(0.2)
    assert node.stops == 1 and node.term is None


async def test_a_moved_point_cancels_the_earlier_timer() -> None:
    node, lease = Node(), FakeLease()
    f = fencing(node, lease)
    node.now = f.point() - 0.05
    f.lease_changed()
    lease.acked_send += 1.0  # a keepalive confirmed: the point moved a second later
    f.lease_changed()
    node.now += 0.05  # the old point
    await asyncio.sleep(0.2)
    assert node.stops == 0 and node.term == TERM
    f.cancel()


def test_a_lost_lease_fences_at_once() -> None:
    node, lease = Node(), FakeLease(lease=None)
    f = fencing(node, lease)
    f.lease_changed()
    assert node.stops == 1 and node.term is None
    assert node.watchdog == [-float("inf")]
    assert node.leases == [None]


async def test_the_watchdog_is_told_each_lease_it_would_revoke() -> None:
    """Told with every change of the fence point, before its new deadline: a watchdog
    whose agent dies right after a new grant revokes the new lease, not the old."""
    node, lease = Node(term=None, up=False), FakeLease(lease=0x1A)
    f = fencing(node, lease)
    f.lease_changed()
    lease.lease = 0x2B
    f.lease_changed()
    f.cancel()
    assert node.leases == [0x1A, 0x2B]


def test_no_term_and_nothing_up_is_no_fence() -> None:
    node, lease = Node(term=None, up=False), FakeLease(lease=None)
    f = fencing(node, lease)
    f.lease_changed()
    assert node.stops == 0 and node.events == []
