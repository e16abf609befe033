"""The agent's side of holds, without sockets or etcd: when this node promises, what
binds it, and the fence point a peer's promise moves (on a fake clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hapair.shared.log import EventLog
from hapair.workshop_agent.fencing import Fencing
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.holding import Holding, keepalive_late, next_check
from hapair.workshop_agent.observation import HandoverView
from hapair.workshop_agent.peer_wire import Hold, HoldReply, Release
from tests.unit.test_fencing import FENCE_AFTER, FakeLease

TTL = 2.0


@dataclass
class Node:
    term: int | None = None
    active: bool = False
    newest_epoch: int | None = 5
    revision: int = 5
    wakes: int = 0
    dirty: int = 0
    moved: list[float] = field(default_factory=list)


def holding(node: Node, lease: FakeLease | None = None) -> tuple[Holding, Fencing]:
    lease = lease or FakeLease()
    ledger = Ledger()
    log = EventLog("test")
    fencing = Fencing(
        lease,
        ledger,
        lambda: 100.0,
        log,
        term=lambda: node.term,
        end_term=lambda: node.term,
        hold_peers=lambda: {"b"},
        fence_margin=lambda: 0.5,
        watchdog_deadline=node.moved.append,
        watchdog_lease=lambda _: None,
        active_up=lambda: node.active,
        stop_active=lambda: None,
        event=lambda *a, **k: None,
        changed=lambda: None,
    )
    h = Holding(
        lease,  # type: ignore[arg-type]
        ledger,
        fencing,
        None,  # type: ignore[arg-type]  # no peer path: these tests send nothing
        lambda: 100.0,
        log,
        term=lambda: node.term,
        active=lambda: node.term is not None or node.active,
        stopped=lambda: False,
        newest_epoch=lambda: node.newest_epoch,
        seen_revision=lambda: node.revision,
        lease_ttl=lambda: TTL,
        wake=lambda: setattr(node, "wakes", node.wakes + 1),
        dirty=lambda: setattr(node, "dirty", node.dirty + 1),
    )
    return h, fencing


def test_a_standby_promises_and_is_then_bound_for_the_ttl() -> None:
    node = Node()
    h, _ = holding(node)
    assert h.on_hold(Hold("b", 1, 5, TTL), 100.0) == (True, "", TTL)
    assert node.wakes == 1
    assert h.held_by(101.0, None) == "b (epoch 5)"
    assert h.promised_to == "b" and node.dirty == 1
    assert h.held_by(101.5, None) == "b (epoch 5)" and node.dirty == 1  # no change
    assert h.held_by(100.0 + TTL, None) is None
    assert h.promised_to is None and node.dirty == 2


def test_a_promise_renewed_for_the_beats_wakes_nothing_one_for_the_lease_does() -> None:
    """The beats' holds come every interval: each promise renewed only moves the
    instant this node may take over, found when the loop wakes then. A hold for the
    lease while one binds is news: the status names the holder from then on."""
    node = Node()
    h, _ = holding(node)
    h.on_hold(Hold("b", 1, 5, 0.3, beat=True), 100.0)
    assert node.wakes == 1
    h.on_hold(Hold("b", 2, 5, 0.3, beat=True), 100.05)
    assert node.wakes == 1, "renewed"
    assert h.held_by(100.1, None) is None, "no promise for the lease"
    h.on_hold(Hold("b", 3, 5, TTL), 100.1)
    assert node.wakes == 2, "a hold for the lease"
    assert h.held_by(100.1, None) == "b (epoch 5)"


def test_a_promise_for_the_beats_binds_a_takeover_by_beat_not_a_campaign() -> None:
    """A promise for the beats lifts the active's beat guard, never its fence point past
    its lease's: once the leader key is gone a campaign need not wait for it (a killed
    agent's pair is campaigned for as soon as its watchdog revokes the lease). One for
    the lease binds both."""
    node = Node()
    h, _ = holding(node)
    h.on_hold(Hold("b", 1, 5, 0.3, beat=True), 100.0)
    assert h.binding(100.1, None, by_beat=True) is not None
    assert h.binding(100.1, None, by_beat=False) is None
    h.on_hold(Hold("b", 2, 5, TTL), 100.1)
    assert h.binding(100.2, None, by_beat=False) is not None
    assert h.binding(100.2, None, by_beat=True) is not None


def test_no_promise_while_active_campaigning_or_for_a_stale_term() -> None:
    node = Node(term=6)
    h, _ = holding(node)
    assert h.on_hold(Hold("b", 1, 6, TTL), 100.0) == (False, "this node is active", 0.0)
    node.term, node.active = None, True
    assert h.on_hold(Hold("b", 1, 6, TTL), 100.0) == (False, "this node is active", 0.0)
    node.active = False
    with h.campaigning():
        assert h.on_hold(Hold("b", 1, 6, TTL), 100.0) == (False, "this node is campaigning", 0.0)
    promised, why, _ = h.on_hold(Hold("b", 1, 4, TTL), 100.0)
    assert not promised and "stale" in why
    assert h.held_by(100.0, None) is None and node.wakes == 0


def test_a_release_or_the_holders_handover_record_ends_the_promise() -> None:
    node = Node()
    h, _ = holding(node)
    h.on_hold(Hold("b", 1, 5, TTL), 100.0)
    assert h.binding(100.5, HandoverView("a", "b", 40, 100.2, epoch=5)) is None
    h.on_hold(Hold("b", 2, 5, TTL), 100.0)
    h.on_release(Release("b", 3, 5))
    assert h.binding(100.5, None) is None


async def test_a_peers_promise_moves_the_fence_point_of_the_active() -> None:
    node = Node(term=5)
    lease = FakeLease()
    h, fencing = holding(node, lease)
    h.ledger.sent(5, 1, 101.0, TTL)
    assert fencing.point() == pytest.approx(100.0 + FENCE_AFTER)
    h.on_hold_reply(HoldReply("b", "a", 1, 5, True, ttl=TTL), 101.1)
    assert fencing.point() == pytest.approx(101.0 + FENCE_AFTER)
    assert node.moved[-1] == pytest.approx(101.0 + FENCE_AFTER + 0.25)  # the watchdog's
    h.on_hold_reply(HoldReply("b", "a", 1, 4, True, ttl=TTL), 101.2)  # another term's: ignored
    assert fencing.point() == pytest.approx(101.0 + FENCE_AFTER)
    fencing.cancel()


def test_the_hold_loop_wakes_when_a_keepalive_becomes_late_not_at_its_next_tick() -> None:
    # A 1 s lease: keepalives every 0.25 s, late 0.375 s after the last acknowledged send.
    interval, acked = 0.25, 100.0
    assert not keepalive_late(100.375, acked, interval)
    assert keepalive_late(100.376, acked, interval)
    assert not keepalive_late(100.0, None, interval)
    # Just after a confirmation: half an interval (0.125 s) is sooner than lateness.
    assert next_check(100.0, acked, interval) == pytest.approx(0.125)
    # 0.3 s after it: a tick of 0.125 s would ask the peers at 0.425 s, 50 ms late.
    assert next_check(100.3, acked, interval) == pytest.approx(0.076)
    # Late already: holds go out every half interval.
    assert next_check(100.4, acked, interval) == pytest.approx(0.125)
    assert next_check(100.4, None, interval) == pytest.approx(0.125)
