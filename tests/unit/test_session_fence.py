"""The fence point of the lease session, on an injected clock.

The store is a stand-in that answers after a chosen round trip (the clock advances while
a request is in flight), so the tests can tell the send of a keepalive from its answer:
the fence point must count from the send, and come before etcd can expire the lease.
"""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.topology import Failover

TTL, FENCE_AFTER = 2.0, 1.5


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SlowStore:
    """Answers each grant and keepalive ``rtt`` seconds (of the clock) after the send."""

    def __init__(self, clock: Clock, rtt: float, ttl: float = TTL) -> None:
        self.clock, self.rtt, self.ttl = clock, rtt, ttl
        self.sends: list[float] = []

    async def grant_lease(self, ttl: float) -> tuple[int, int]:
        self.sends.append(self.clock.now)
        self.clock.now += self.rtt
        return 7, max(int(self.ttl), math.ceil(ttl))

    async def keepalive(self, lease: int) -> float:
        self.sends.append(self.clock.now)
        self.clock.now += self.rtt
        return self.ttl

    async def revoke(self, lease: int) -> None:
        pass


async def confirmed(session: Session, times: int = 1) -> None:
    """Run the session until it has confirmed its lease ``times`` times, then stop it."""
    task = asyncio.create_task(session.run())
    try:
        for _ in range(times):
            session.renewed.clear()
            await asyncio.wait_for(session.renewed.wait(), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def session(clock: Clock, store: SlowStore) -> Session:
    return Session(store, TTL, FENCE_AFTER, EventLog("test"), clock)  # type: ignore[arg-type]


async def test_the_fence_point_counts_from_the_send_not_the_answer() -> None:
    clock = Clock(100.0)
    store = SlowStore(clock, rtt=0.3)
    s = session(clock, store)
    await confirmed(s)
    assert store.sends == [100.0] and clock.now == pytest.approx(100.3)
    assert s.acked_send == 100.0
    assert s.fence_deadline == pytest.approx(100.0 + FENCE_AFTER)
    assert s.valid(100.0 + FENCE_AFTER - 0.001)
    assert not s.valid(100.0 + FENCE_AFTER)
    # The answer came 0.3 s after the send: counted from it, the agent would act until
    # 101.8, later than etcd's TTL allows a standby to wait.
    assert not s.valid(clock.now + FENCE_AFTER - 0.01)


async def test_each_confirmed_keepalive_moves_the_fence_point_to_its_send() -> None:
    clock = Clock(50.0)
    store = SlowStore(clock, rtt=0.9)  # a slow etcd: the answer takes most of a period
    s = session(clock, store)
    await confirmed(s, times=2)
    last = store.sends[-1]
    assert s.acked_send == last
    assert s.fence_deadline == pytest.approx(last + FENCE_AFTER)
    assert not s.valid(last + FENCE_AFTER)


async def test_the_fence_point_and_the_watchdog_come_before_the_lease_can_expire() -> None:
    """etcd expires the lease ``ttl`` after it *received* the keepalive, which is after
    it was sent: both the agent (fence point) and its watchdog (half the margin later)
    act before send + ttl, for every accepted timing."""
    for ttl, margin in [
        (1.0, 0.5),
        (1.0, 0.1),
        (2.0, 0.5),
        (2.0, 1.0),
        (2.0, 0.01),
        (10.0, 3.0),
        (60.0, 0.5),
    ]:
        f = Failover(lease_ttl_s=ttl, fence_margin_s=margin)
        clock = Clock(10.0)
        s = Session(SlowStore(clock, 0.05, ttl), ttl, f.fence_after_s, EventLog("t"), clock)  # type: ignore[arg-type]
        await confirmed(s)
        sent = 10.0
        watchdog = s.fence_deadline + margin / 2  # what the agent gives its watchdog
        assert s.fence_deadline < watchdog < sent + ttl
        assert not s.valid(sent + ttl - margin)


async def test_a_lost_or_unanswered_lease_is_never_valid() -> None:
    clock = Clock(0.0)
    s = session(clock, SlowStore(clock, 0.01))
    assert not s.valid(0.0)  # no lease yet
    assert s.fence_deadline == -float("inf")
    await confirmed(s)
    assert s.valid(clock.now)
    await s.close()
    assert not s.valid(clock.now)


class BrokenOnceStore(SlowStore):
    """Its first keepalive fails with an error the store does not translate (a closed
    gRPC channel, a library bug): the session must go on renewing, not end."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, 0.01)
        self.broken = True

    async def keepalive(self, lease: int) -> float:
        if self.broken:
            self.broken = False
            raise RuntimeError("channel closed under the call")
        return await super().keepalive(lease)


async def test_an_unexpected_error_does_not_end_the_lease_session() -> None:
    clock = Clock(0.0)
    store = BrokenOnceStore(clock)
    s = session(clock, store)
    await confirmed(s, times=2)  # granted, then confirmed again after the failure
    assert not store.broken and len(store.sends) >= 2
    assert s.acked_send == store.sends[-1]


async def test_a_lease_granted_longer_than_asked_is_said_once_and_keeps_the_asked_fence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """etcd with its default raft timing grants 2 s for a 1 s lease: the holder fences
    from the TTL it asked (earlier than etcd drops the lease: safe) and says why
    takeovers after a crash take longer."""
    clock = Clock(100.0)
    store = SlowStore(clock, rtt=0.01, ttl=2.0)
    s = Session(store, 1.0, 0.5, EventLog("test"), clock)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        await confirmed(s, times=3)
    assert s.granted_ttl == 2 and s.ttl == 1.0
    assert s.fence_deadline == pytest.approx(s.acked_send + 0.5)  # type: ignore[operator]
    warned = [r for r in caplog.records if "longer lease than asked" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].fields["asked"] == 1.0 and warned[0].fields["granted"] == 2  # type: ignore[attr-defined]


async def test_a_lease_granted_as_asked_is_not_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(100.0)
    store = SlowStore(clock, rtt=0.01, ttl=1.0)
    s = Session(store, 1.0, 0.5, EventLog("test"), clock)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        await confirmed(s)
    assert s.granted_ttl == 1
    assert not [r for r in caplog.records if "longer lease" in r.getMessage()]
