"""A node fencing itself in a loop: the advice names what was late and the setting that
fits, and the loop is said once, while it lasts, on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import pytest

from hapair.shared.log import EventLog
from hapair.shared.slowest import Slowest, late_wake
from hapair.shared.topology import Failover, TermBeat
from hapair.workshop_agent.fence_loop import (
    LOOP,
    WINDOW_S,
    FenceLoop,
    Figures,
    Lateness,
    advice,
)

BEATING = Failover(term_beat=TermBeat())  # 50/150/150 on the 2 s lease


def beat(round_trip_s: float | None, lag_s: float | None = 0.002) -> Figures:
    return Figures("term beat", 0.15, 0.05, round_trip_s, lag_s)


def test_a_far_etcd_is_told_the_beat_whose_budget_holds_its_slowest_answer() -> None:
    said = advice(beat(0.13), BEATING, peer_path=False, realtime=True)
    assert said.startswith(
        "etcd answered in up to 130 ms, of 100 ms (the fence of 150 ms less an interval)"
    )
    # Twice 130 ms within three quarters of the fence, up to the next 50 ms; a quarter of
    # it between beats.
    assert said.endswith(
        "set failover.term_beat to interval_ms 90, fence_ms 350, margin_ms 350, or a longer fence"
    )


def test_the_beat_told_is_always_longer_than_the_one_that_loops() -> None:
    # 60 ms takes more than half the budget: blamed, though twice it fits in the fence
    # in use.
    said = advice(beat(0.06), BEATING, peer_path=False, realtime=True)
    assert said.endswith("interval_ms 50, fence_ms 200, margin_ms 200, or a longer fence")


def test_an_etcd_too_far_for_any_beat_below_the_lease_is_told_to_leave_the_beat_out() -> None:
    said = advice(beat(0.3), BEATING, peer_path=True, realtime=True)
    # An 800 ms fence and its margin would take a pair over no sooner than the lease (1.5 s).
    assert "leave failover.term_beat out, the lease alone is as fast" in said


def test_a_late_agent_is_told_real_time_priority_when_it_runs_without() -> None:
    said = advice(beat(0.13, lag_s=0.08), BEATING, peer_path=True, realtime=False)
    assert said.startswith("this agent's own loop woke up to 80 ms late, of 100 ms")
    assert "--realtime-priority" in said
    said = advice(beat(0.13, lag_s=0.08), BEATING, peer_path=True, realtime=True)
    assert "lighten the server's load" in said and "--realtime-priority" not in said


def test_neither_late_nor_slow_is_a_stall_and_a_pair_without_peer_path_is_told_to_add_one() -> None:
    said = advice(beat(0.01), BEATING, peer_path=False, realtime=True)
    assert said.startswith("etcd left requests unanswered past the fence")
    assert "give the pair a peer path" in said
    said = advice(beat(None), BEATING, peer_path=True, realtime=True)
    assert "(its answers came in up to -)" in said and "peers' promises did not cover" in said


def test_a_slow_keepalive_is_told_a_lease_ttl_whose_budget_holds_its_slowest_answer() -> None:
    def lease(round_trip_s: float) -> str:
        return advice(Figures("lease", 1.5, 0.5, round_trip_s, 0.0), Failover(), True, True)

    # The budget, ttl - 0.5 s less an interval (ttl / 4), holds twice 2 s.
    assert lease(2.0).endswith("raise failover.lease_ttl_s (now 2) to 6")
    # Never below the TTL in use plus a second, never above the bound of the setting.
    assert lease(0.6).endswith("to 3")
    assert lease(30.0).endswith("to 60")


def test_slowest_forgets_what_left_its_span() -> None:
    s = Slowest(span_s=10.0)
    assert s.worst(0.0) is None
    s.note(0.0, 0.5)
    s.note(5.0, 0.1)
    assert s.worst(9.0) == 0.5
    assert s.worst(10.5) == 0.1
    assert s.worst(16.0) is None


@dataclass
class Node:
    now: float = 1000.0
    events: list[tuple[str, str]] = field(default_factory=list)
    dirtied: int = 0

    def event(self, kind: str, reason: str = "", **_: object) -> None:
        self.events.append((kind, reason))

    def dirty(self) -> None:
        self.dirtied += 1


def loop_of(node: Node) -> FenceLoop:
    def figures(kind: Lateness) -> Figures:
        return Figures(kind, 0.15, 0.05, 0.13, 0.001)

    return FenceLoop(
        lambda: node.now,
        EventLog("test.fence_loop", node="a"),
        figures=figures,
        settings=lambda: (BEATING, False),
        realtime=lambda: True,
        event=node.event,
        dirty=node.dirty,
    )


async def test_a_loop_is_said_once_while_it_lasts_and_over_once_the_window_passes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "test.fence_loop")
    node = Node()
    loop = loop_of(node)
    for _ in range(LOOP - 1):
        loop.late("term beat")
        node.now += 60
    assert loop.problem() is None and not node.events, "two fences are no loop"
    timers: list[tuple[float, object]] = []
    monkeypatch.setattr(
        asyncio.get_running_loop(), "call_later", lambda delay, fn: timers.append((delay, fn))
    )
    loop.late("term beat")
    problem = loop.problem()
    assert problem is not None and problem.startswith(
        "fencing itself in a loop (3 fences within 10 min): etcd answered in up to 130 ms"
    )
    assert [kind for kind, _ in node.events] == ["fence_loop"]
    node.now += 30
    loop.late("term beat")  # a fourth fence: still the same loop, said once
    assert len(node.events) == 1
    assert sum("fencing itself in a loop" in r.message for r in caplog.records) == 1
    assert loop.problem() is not None and "(4 fences" in loop.problem()  # type: ignore[operator]
    # The timer wakes when the oldest of the last three leaves the window: at 1060 + 600.
    delay, over = timers[-1]
    assert node.now + delay == pytest.approx(1060.0 + WINDOW_S)
    node.now += delay - 1.0  # woken a second early: still a loop, the timer armed again
    over()  # type: ignore[operator]
    assert loop.problem() is not None
    delay, over = timers[-1]
    node.now += delay
    dirtied = node.dirtied
    over()  # type: ignore[operator]
    assert loop.problem() is None and node.dirtied == dirtied + 1
    assert any("no longer fencing itself in a loop" in r.message for r in caplog.records)


async def test_late_wake_counts_the_loop_held_past_its_wake_not_the_wait_before_it() -> None:
    lag = Slowest()
    at = time.monotonic() - 1.0  # a whole second spent awaiting etcd before: not the loop's
    await late_wake(at, time.monotonic, lag)
    quick = lag.worst(time.monotonic())
    assert quick is not None and quick < 0.5
    lag = Slowest()
    at = time.monotonic() + 0.01
    # Something else holds the loop from before the wake to 50 ms after it.
    asyncio.get_running_loop().call_later(0.005, time.sleep, 0.055)
    await late_wake(at, time.monotonic, lag)
    held = lag.worst(time.monotonic())
    assert held is not None and held >= 0.04
