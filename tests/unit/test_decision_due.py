"""When the decision is due again with no news (``decide.due``), on an injected clock.

The agent's loop runs a round on any news and otherwise sleeps until ``due``: each
time-driven decision must come by its instant, and no decision may change before it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapair.shared.topology import Pair
from hapair.workshop_agent import recovery
from hapair.workshop_agent.decide import Campaign, Decision, Fence, Handover, decide, due
from hapair.workshop_agent.observation import HandoverView, LeaderView, Lost, Observation, PeerView
from hapair.workshop_agent.term_beat import TakeoverGuard
from tests.unit.test_decide import LEASE, PAIR, obs, peer_views

MINE = LeaderView("a", 5, LEASE)
AUTO = PAIR.model_copy(
    update={
        "failover": PAIR.failover.model_copy(update={"failback": "auto", "failback_after_s": 30.0})
    }
)
UP = {"a": PeerView("standby", True), "c": PeerView("standby", True)}


def at_due(o: Observation) -> Observation:
    """The same facts, on the next round the loop runs with no news."""
    when = due(o)
    assert o.now < when < math.inf
    return replace(o, now=when)


def waits_then_acts(o: Observation) -> Decision:
    """``o`` waits; the round at its due instant acts. The decision it then takes."""
    assert decide(o).actions == ()
    later = decide(at_due(o))
    assert later.actions != ()
    return later


# ---- one test per time-driven decision ------------------------------------------------


def test_a_node_behind_a_preferred_one_campaigns_when_its_delay_is_up() -> None:
    o = obs(me="b", peers=UP, leader_absent_since=99.9)
    assert due(o) == pytest.approx(99.9 + PAIR.failover.campaign_delay_s)
    assert waits_then_acts(o).actions == (Campaign(None, 0),)


def test_a_standby_takes_over_by_beat_when_the_active_s_beats_are_overdue() -> None:
    guard = TakeoverGuard(5, 40, 3, 4, 0)
    o = obs(
        me="b",
        leader=LeaderView("a", 5, LEASE),
        leader_absent_since=None,
        seen_leader=True,
        beat_takeover_at=100.3,
        beat_guard=guard,
    )
    assert decide(o).reason == "standby, a active at epoch 5"
    assert due(o) == pytest.approx(100.3)
    later = waits_then_acts(o)
    assert later.actions == (Campaign(None, 0, guard),)
    assert later.reason.startswith("a's term beats stopped (epoch 5)")


def test_a_beat_of_another_term_or_a_binding_promise_takes_nothing_over() -> None:
    old = obs(
        me="b",
        now=101.0,
        leader=LeaderView("a", 6, LEASE),
        leader_absent_since=None,
        beat_takeover_at=100.3,
        beat_guard=TakeoverGuard(5, 40),
    )
    assert decide(old).actions == ()
    held = replace(old, leader=LeaderView("a", 5, LEASE), held_by="a (epoch 5)")
    assert decide(held).actions == ()


def test_a_node_behind_a_preferred_one_takes_over_by_beat_after_its_delay() -> None:
    o = obs(
        me="c",
        # The crashed active's status still says it is active (its lease lives on).
        peers={"a": PeerView("active", True), "b": PeerView("standby", True)},
        leader=LeaderView("a", 5, LEASE),
        leader_absent_since=None,
        seen_leader=True,
        beat_takeover_at=99.9,
        beat_guard=TakeoverGuard(5, 40),
    )
    assert due(o) == pytest.approx(99.9 + PAIR.failover.campaign_delay_s)
    assert [type(a) for a in waits_then_acts(o).actions] == [Campaign]


def test_a_drifted_node_campaigns_a_lease_after_a_preferred_holder() -> None:
    o = obs(
        me="a", peers={"b": PeerView("standby", True)}, lacks=("svc",), leader_absent_since=99.0
    )
    assert due(o) == pytest.approx(99.0 + PAIR.failover.campaign_delay_s + o.lease_ttl)
    assert [type(a) for a in waits_then_acts(o).actions] == [Campaign]


def test_a_standby_gives_the_main_server_its_time_to_start() -> None:
    o = obs(me="b", started_at=98.0, leader_absent_since=98.0)
    assert due(o) == 98.0 + 2 * o.lease_ttl
    assert [type(a) for a in waits_then_acts(o).actions] == [Campaign]


def test_a_node_that_stepped_down_campaigns_when_its_hold_off_ends() -> None:
    o = obs(holdoff_until=101.5)
    assert due(o) == 101.5
    assert [type(a) for a in waits_then_acts(o).actions] == [Campaign]


def test_a_restarted_agent_campaigns_when_its_earlier_promises_have_run_out() -> None:
    o = obs(forgotten_promises_until=101.0)
    assert due(o) == 101.0
    assert [type(a) for a in waits_then_acts(o).actions] == [Campaign]


def test_a_stale_handover_to_another_node_stops_holding_a_campaign() -> None:
    handover = HandoverView("c", "b", revision=40, seen_at=99.5)
    o = obs(handover=handover)
    assert due(o) == 99.5 + o.lease_ttl
    assert waits_then_acts(o).actions == (Campaign(40, 0),)


def test_a_lost_critical_resource_moves_the_pair_when_its_grace_is_up() -> None:
    peers = {"b": PeerView("standby", True, reaches=frozenset({"plc"}))}
    o = obs(term=5, leader=MINE, services_up=True, peers=peers, lost={"plc": Lost(99.0, 2.5)})
    assert due(o) == 101.5
    assert waits_then_acts(o).actions == (Handover("b", None, "plc lost on the active", False),)


def test_failback_comes_when_the_main_has_been_healthy_long_enough() -> None:
    o = obs(
        me="b",
        pair=AUTO,
        term=5,
        leader=LeaderView("b", 5, LEASE),
        services_up=True,
        peers={"a": PeerView("standby", True, healthy_since=80.0)},
    )
    assert due(o) == 110.0
    assert waits_then_acts(o).actions == (Handover("a", None, "failback"),)


def test_the_round_at_the_fence_point_fences() -> None:
    """The fence timer fences at that point on its own; a round runs then as well."""
    o = obs(term=5, leader=MINE, services_up=True, lease_ok_until=100.8)
    assert due(o) == 100.8
    # The loop reads the lease as lapsed from then on.
    assert [type(a) for a in decide(replace(at_due(o), lease_ok=False)).actions] == [Fence]


def test_a_view_reckoned_from_the_clock_is_read_again_when_it_runs_out() -> None:
    """A promise not to campaign, or a target's refusal, runs out at its instant."""
    held = obs(held_by="b (epoch 4)", view_expires_at=101.2)
    assert due(held) == 101.2
    assert decide(held).actions == ()
    assert [type(a) for a in decide(replace(at_due(held), held_by=None)).actions] == [Campaign]


def test_nothing_due_while_an_active_runs_undisturbed() -> None:
    o = obs(term=5, leader=MINE, services_up=True, peers=UP, started_at=0.0)
    assert due(o) == math.inf


def test_instants_already_past_are_not_due() -> None:
    o = obs(holdoff_until=50.0, forgotten_promises_until=99.0, lease_ok_until=100.0)
    assert due(o) == math.inf


def test_held_services_are_released_when_the_first_auto_ack_is_up() -> None:
    pair = Pair.model_validate(
        {
            "name": "p",
            "nodes": [
                {"name": "a", "address": "127.0.0.1"},
                {"name": "b", "address": "127.0.0.2"},
            ],
            "services": [
                {"name": "x", "command": ["true"], "hold_until_ack": True, "auto_ack_after_s": 30},
                {"name": "y", "command": ["true"], "hold_until_ack": True, "auto_ack_after_s": 10},
                {"name": "z", "command": ["true"], "hold_until_ack": True},
            ],
        }
    )
    assert recovery.release_at(pair, {"x", "y", "z"}, 100.0) == 110.0
    assert recovery.release_at(pair, {"x", "z"}, 100.0) == 130.0
    assert recovery.release_at(pair, {"z"}, 100.0) == math.inf
    # What release_due releases from then on, and not before.
    assert recovery.release_due(pair, frozenset({"x", "y"}), None, 5, 9.9) == frozenset()
    assert recovery.release_due(pair, frozenset({"x", "y"}), None, 5, 10.0) == {"y"}


# ---- no decision changes before it is due ---------------------------------------------

# Instants and durations to the millisecond: one far below the resolution of a reading
# of the clock would be lost in a sum with it (1.0 + 1e-193 == 1.0).
instants = st.integers(0, 200_000).map(lambda ms: ms / 1000)
durations = st.integers(0, 20_000).map(lambda ms: ms / 1000)
peers_in_play = peer_views(
    healthy_since=st.one_of(st.none(), instants),
    reaches=st.frozensets(st.sampled_from(["plc", "db"])),
    held_by=st.sampled_from([None, None, None, "a"]),
    lacks=st.sampled_from([(), ("svc",)]),
)
# A standby with no active node in etcd: every delay of a campaign in play.
standbys = st.builds(
    obs,
    me=st.sampled_from(["a", "b", "c"]),
    now=instants,
    pair=st.sampled_from([PAIR, AUTO]),
    leader_absent_since=st.one_of(st.none(), instants),
    started_at=instants,
    holdoff_until=instants,
    forgotten_promises_until=instants,
    seen_leader=st.booleans(),
    lacks=st.sampled_from([(), ("svc",)]),
    peers=peers_in_play,
    handover=st.one_of(
        st.none(),
        st.builds(
            HandoverView,
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 50),
            instants,
        ),
    ),
)
# An active holding its term: a lost resource's grace, a failback.
actives = st.builds(
    obs,
    me=st.sampled_from(["a", "b", "c"]),
    now=instants,
    pair=st.sampled_from([PAIR, AUTO]),
    term=st.just(5),
    services_up=st.booleans(),
    peers=peers_in_play,
    lost=st.dictionaries(st.sampled_from(["plc", "db"]), st.builds(Lost, instants, durations)),
).map(lambda o: replace(o, leader=LeaderView(o.me, 5, LEASE)))


# A standby with an active in etcd whose term beats it watches: the takeover by beat due
# at some instant, behind the preferred nodes' turn.
beat_standbys = st.builds(
    obs,
    me=st.sampled_from(["b", "c"]),
    now=instants,
    pair=st.sampled_from([PAIR, AUTO]),
    leader=st.just(LeaderView("a", 5, LEASE)),
    leader_absent_since=st.none(),
    started_at=instants,
    holdoff_until=instants,
    forgotten_promises_until=instants,
    seen_leader=st.just(True),
    peers=peers_in_play,
    beat_takeover_at=instants,
    beat_guard=st.just(TakeoverGuard(5, 40)),
)


@pytest.mark.long
@given(
    st.one_of(standbys, actives, beat_standbys),
    st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8),
)
@settings(max_examples=3000)
def test_no_decision_changes_before_it_is_due(o: Observation, fractions: list[float]) -> None:
    """Any instant between a round and the next one due decides as the round did: a
    round skipped there misses nothing."""
    until = due(o)
    assert until > o.now
    span = min(until, o.now + 1_000.0) - o.now
    for f in fractions:
        later = o.now + f * span
        if later < until:  # rounding may land on the instant itself
            assert decide(replace(o, now=later)) == decide(o), later
