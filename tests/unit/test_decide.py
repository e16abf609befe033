"""The pure decision: tables of cases and properties over any sequence of observations."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapair.shared.database import DatabaseConfig
from hapair.shared.topology import Pair
from hapair.workshop_agent.candidates import beat_peers, hold_peers
from hapair.workshop_agent.decide import (
    Adopt,
    Campaign,
    Decision,
    Fence,
    Handover,
    Reclaim,
    RejectSwitchover,
    Resign,
    SettleStepDown,
    StartServices,
    decide,
)
from hapair.workshop_agent.observation import (
    HandoverView,
    LeaderView,
    Lost,
    Observation,
    PeerView,
    SwitchoverView,
)
from hapair.workshop_agent.term_beat import TakeoverGuard

PAIR = Pair.model_validate(
    {
        "name": "p",
        "nodes": [
            {"name": "a", "address": "127.0.0.1"},
            {"name": "b", "address": "127.0.0.2"},
            {"name": "c", "address": "127.0.0.3"},
        ],
    }
)
LEASE = 7


def obs(me: str = "a", **kw: Any) -> Observation:
    base = Observation(
        now=100.0,
        me=me,
        pair=PAIR,
        synced=True,
        lease=LEASE,
        lease_ok=True,
        leader=None,
        leader_absent_since=100.0,
        term=None,
        services_up=False,
        failure=None,
        healthy=True,
        holdoff_until=0.0,
        started_at=0.0,
    )
    return replace(base, **kw)


def kinds(d: Decision) -> list[type]:
    return [type(a) for a in d.actions]


MINE = LeaderView("a", 5, LEASE)
UP = {"b": PeerView("standby", True), "c": PeerView("standby", True)}


@pytest.mark.parametrize(
    ("case", "o", "expected"),
    [
        ("main campaigns at once", obs(), [Campaign]),
        ("no lease: nothing", obs(lease=None, lease_ok=False), []),
        (
            "lease unconfirmed while active: fence",
            obs(lease_ok=False, term=5, leader=MINE, services_up=True),
            [Fence],
        ),
        ("won: start services", obs(term=5, leader=MINE), [StartServices]),
        ("running: nothing", obs(term=5, leader=MINE, services_up=True), []),
        (
            "key now someone else's: fence",
            obs(term=5, leader=LeaderView("b", 9, 3), services_up=True),
            [Fence],
        ),
        ("key gone: fence", obs(term=5, leader=None, services_up=True), [Fence]),
        ("services without a term: fence", obs(services_up=True), [Fence]),
        ("critical failure: resign", obs(term=5, leader=MINE, failure="x died"), [Resign]),
        (
            "critical failure while paused: stay",
            obs(term=5, leader=MINE, failure="x died", paused=True, services_up=True),
            [],
        ),
        ("own key on our lease: adopt", obs(leader=MINE), [Adopt]),
        ("own key from an earlier run: reclaim", obs(leader=LeaderView("a", 5, 99)), [Reclaim]),
        (
            "own key of a term given up, etcd did not answer: send the step-down again",
            obs(leader=MINE, left_term=5, step_down_unanswered=True),
            [SettleStepDown],
        ),
        ("own key of a term given up: a lagging view, wait", obs(leader=MINE, left_term=5), []),
        (
            "earlier run's key of a term given up: no reclaim",
            obs(leader=LeaderView("a", 5, 99), left_term=6),
            [],
        ),
        ("own key of a newer term: adopt", obs(leader=MINE, left_term=4), [Adopt]),
        (
            "a peer promised an active this node may not know of: no campaign",
            obs(me="c", peers={"b": PeerView("standby", True, held_by="a")}),
            [],
        ),
        (
            "a peer still bound by a promise to this node: campaign",
            obs(peers={"b": PeerView("standby", True, held_by="a")}),
            [Campaign],
        ),
        (
            "a peer bound by a promise, handover to this node: campaign",
            obs(
                me="c",
                peers={"b": PeerView("standby", True, held_by="a")},
                handover=HandoverView("c", "a", 3, 100.0),
            ),
            [Campaign],
        ),
        ("another active: standby", obs(me="b", leader=MINE), []),
        ("paused: no campaign", obs(me="b", paused=True, peers={}), []),
        ("view not synced: no campaign", obs(synced=False), []),
        ("drained: no campaign", obs(drained=frozenset({"a"})), []),
        ("unhealthy: no campaign", obs(healthy=False), []),
        (
            "no_failover node: no campaign",
            obs(
                me="b",
                pair=PAIR.model_copy(
                    update={
                        "nodes": [
                            PAIR.nodes[0],
                            PAIR.nodes[1].model_copy(update={"no_failover": True}),
                            PAIR.nodes[2],
                        ]
                    }
                ),
            ),
            [],
        ),
        ("holding off: no campaign", obs(holdoff_until=101.0), []),
        ("secondary right after start waits for the main", obs(me="b", started_at=99.5), []),
        ("secondary with the main down campaigns", obs(me="b", peers={}), [Campaign]),
        (
            "secondary that saw an active fail campaigns even right after its start",
            obs(me="b", started_at=99.5, seen_leader=True),
            [Campaign],
        ),
        (
            "secondary waits while a preferred node is up",
            obs(me="c", peers={"a": PeerView("standby", True)}, leader_absent_since=99.9),
            [],
        ),
        (
            "... and campaigns after its delay",
            obs(me="c", peers={"a": PeerView("standby", True)}, leader_absent_since=99.0),
            [Campaign],
        ),
        (
            "handover to someone else: wait",
            obs(me="c", handover=HandoverView("b", "a", 40, 99.9)),
            [],
        ),
        (
            "handover to me: campaign",
            obs(me="b", handover=HandoverView("b", "a", 40, 99.9)),
            [Campaign],
        ),
        (
            "handover to me while paused: campaign",
            obs(me="b", paused=True, handover=HandoverView("b", "a", 40, 99.9)),
            [Campaign],
        ),
        (
            "stale handover: anyone",
            obs(me="c", peers={}, handover=HandoverView("b", "a", 40, 90.0)),
            [Campaign],
        ),
        (
            "switchover: hand over to the best standby",
            obs(
                term=5,
                leader=MINE,
                services_up=True,
                peers=UP,
                switchover=SwitchoverView("r", None),
            ),
            [Handover],
        ),
        (
            "switchover to a down node: refuse",
            obs(
                term=5, leader=MINE, services_up=True, peers={}, switchover=SwitchoverView("r", "b")
            ),
            [RejectSwitchover],
        ),
        (
            "switchover while paused: refuse",
            obs(
                term=5,
                leader=MINE,
                services_up=True,
                peers=UP,
                paused=True,
                switchover=SwitchoverView("r", "b"),
            ),
            [RejectSwitchover],
        ),
        (
            "drained active hands over",
            obs(term=5, leader=MINE, services_up=True, peers=UP, drained=frozenset({"a"})),
            [Handover],
        ),
        (
            "drained active with nobody to take over stays",
            obs(term=5, leader=MINE, services_up=True, drained=frozenset({"a"})),
            [],
        ),
    ],
)
def test_decision_table(case: str, o: Observation, expected: list[type]) -> None:
    assert kinds(decide(o)) == expected, case


def test_a_critical_resource_lost_on_the_active_moves_to_a_standby_that_reaches_it() -> None:
    lost = {"plc:press-1": Lost(since=95.0, grace_s=2.0)}
    peers = {
        "b": PeerView("standby", True),
        "c": PeerView("standby", True, reaches=frozenset({"plc:press-1"})),
    }
    o = obs(term=5, leader=MINE, services_up=True, peers=peers, lost=lost)
    assert decide(o).actions == (
        Handover("c", None, "plc:press-1 lost on the active", planned=False),
    )
    # Still within its grace time: stay.
    assert decide(replace(o, lost={"plc:press-1": Lost(99.0, 2.0)})).actions == ()
    # Nobody reaches it: the fault is the PLC's, nobody moves.
    assert decide(replace(o, peers={"b": PeerView("standby", True)})).actions == ()
    # Paused: nobody moves either.
    assert decide(replace(o, paused=True)).actions == ()


def test_switchover_picks_the_first_eligible_in_priority_order() -> None:
    o = obs(
        term=5,
        leader=MINE,
        services_up=True,
        switchover=SwitchoverView("r", None),
        peers={"b": PeerView("standby", False), "c": PeerView("standby", True)},
    )
    assert decide(o).actions == (Handover("c", "r", "switchover"),)


def test_failback_auto_waits_for_the_main_to_be_healthy_long_enough() -> None:
    auto = PAIR.model_copy(
        update={
            "failover": PAIR.failover.model_copy(
                update={"failback": "auto", "failback_after_s": 30.0}
            )
        }
    )
    leader = LeaderView("b", 5, LEASE)
    early = obs(
        me="b",
        pair=auto,
        term=5,
        leader=leader,
        services_up=True,
        peers={"a": PeerView("standby", True, healthy_since=80.0)},
    )
    assert decide(early).actions == ()
    late = replace(early, peers={"a": PeerView("standby", True, healthy_since=60.0)})
    assert decide(late).actions == (Handover("a", None, "failback"),)


# ---- properties ---------------------------------------------------------------------

leaders = st.one_of(
    st.none(),
    st.builds(
        LeaderView,
        st.sampled_from(["a", "b", "c", "?"]),
        st.integers(1, 50),
        st.sampled_from([LEASE, 3, 99]),
    ),
)


def peer_views(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, PeerView]]:
    """Other nodes of the pair, each up or not, with ``fields`` of their views drawn too."""
    return st.dictionaries(
        st.sampled_from(["a", "b", "c"]),
        st.builds(PeerView, st.sampled_from(["active", "standby"]), st.booleans(), **fields),
    )


observations = st.builds(
    obs,
    me=st.sampled_from(["a", "b", "c"]),
    now=st.floats(0, 1000),
    synced=st.booleans(),
    lease=st.sampled_from([LEASE, None]),
    lease_ok=st.booleans(),
    leader=leaders,
    term=st.one_of(st.none(), st.integers(1, 50)),
    services_up=st.booleans(),
    failure=st.one_of(st.none(), st.just("boom")),
    healthy=st.booleans(),
    paused=st.booleans(),
    drained=st.frozensets(st.sampled_from(["a", "b", "c"])),
    peers=peer_views(held_by=st.sampled_from([None, "a", "b", "c"])),
    switchover=st.one_of(
        st.none(),
        st.builds(SwitchoverView, st.just("r"), st.sampled_from([None, "a", "b", "c", "z"])),
    ),
    left_term=st.one_of(st.none(), st.integers(1, 50)),
    forgotten_promises_until=st.floats(0, 1000),
    step_down_unanswered=st.booleans(),
    members=st.one_of(st.none(), st.frozensets(st.sampled_from(["a", "b", "c"]))),
    members_revision=st.integers(0, 50),
    forced=st.sampled_from([None, "a", "b", "c"]),
    handover=st.one_of(
        st.none(),
        st.builds(
            HandoverView,
            st.sampled_from(["a", "b", "c"]),
            st.just("a"),
            st.integers(1, 50),
            st.floats(0, 1000),
        ),
    ),
)


def never_starts_services_without_a_live_lease_and_our_key(o: Observation) -> None:
    for action in decide(o).actions:
        if isinstance(action, StartServices):
            assert o.lease_ok and o.lease is not None
            assert o.leader == LeaderView(o.me, action.epoch, o.lease)
            assert o.term == action.epoch


def fences_whenever_it_cannot_prove_it_is_the_active(o: Observation) -> None:
    ours = o.leader is not None and (o.leader.node, o.leader.epoch, o.leader.lease) == (
        o.me,
        o.term,
        o.lease,
    )
    must_fence = (o.services_up or o.term is not None) and (not o.lease_ok or not ours)
    assert (Fence in kinds(decide(o))) == must_fence


def a_term_given_up_is_never_taken_up_again(o: Observation) -> None:
    for action in decide(o).actions:
        if isinstance(action, Adopt | Reclaim) and o.left_term is not None:
            assert action.epoch > o.left_term


def no_campaign_while_a_promise_may_bind_the_pair(o: Observation) -> None:
    """Neither a promise this agent's previous run may have given, nor one another node
    gave to a third (an active cut off from etcd that may not know this node)."""
    if Campaign in kinds(decide(o)):
        h = o.handover
        handover_to_me = h is not None and h.to == o.me and o.now - h.seen_at < o.lease_ttl
        bound = {p.held_by for p in o.peers.values() if p.held_by} - {o.me}
        assert handover_to_me or (not bound and o.now >= o.forgotten_promises_until)


def campaigns_only_as_an_acknowledged_member(o: Observation) -> None:
    """Outside a handover to it (its writer stopped its services) or an operator's
    forced takeover, a node the pair's active never acknowledged does not campaign; a
    campaign always names the member set it was decided on."""
    for action in decide(o).actions:
        if isinstance(action, Campaign):
            assert action.members_revision == o.members_revision
            h = o.handover
            handover_to_me = h is not None and h.to == o.me and o.now - h.seen_at < o.lease_ttl
            member = o.members is None or o.me in o.members
            assert member or handover_to_me or o.forced == o.me


def campaigns_only_for_a_free_key_with_a_live_lease(o: Observation) -> None:
    if Campaign in kinds(decide(o)):
        assert o.lease_ok and o.leader is None and o.term is None and not o.services_up
        assert o.synced
        handover_to_me = o.handover is not None and o.handover.to == o.me
        assert handover_to_me or not o.paused


SAFETY_PROPERTIES = (
    never_starts_services_without_a_live_lease_and_our_key,
    fences_whenever_it_cannot_prove_it_is_the_active,
    a_term_given_up_is_never_taken_up_again,
    no_campaign_while_a_promise_may_bind_the_pair,
    campaigns_only_as_an_acknowledged_member,
    campaigns_only_for_a_free_key_with_a_live_lease,
)


@pytest.mark.long
@given(observations)
@settings(max_examples=3000)
def test_every_decision_keeps_the_safety_properties(o: Observation) -> None:
    """Each property above holds for the same 3000 random observations: generating an
    observation costs far more than deciding on it, so the properties share them (each
    is checked on as many examples as when it had a test of its own)."""
    for prop in SAFETY_PROPERTIES:
        prop(o)


@given(st.lists(st.tuples(st.booleans(), leaders, st.booleans()), min_size=1, max_size=60))
@settings(max_examples=500)
def test_any_sequence_keeps_services_within_a_live_lease(
    steps: list[tuple[bool, LeaderView | None, bool]],
) -> None:
    """Drive a model agent with random lease states, leader keys and campaign outcomes,
    carrying out each decision; services may run only while the lease is live."""
    term: int | None = None
    up = False
    for lease_ok, leader, won in steps:
        if term is not None and won:
            leader = LeaderView("a", term, LEASE)  # our key survives this step
        d = decide(obs(lease_ok=lease_ok, leader=leader, term=term, services_up=up))
        for action in d.actions:
            match action:
                case Fence():
                    term, up = None, False
                case Campaign() if won:
                    term = 40
                case Adopt(epoch):
                    term = epoch
                case StartServices():
                    up = True
                case Resign() | Handover():
                    term, up = None, False
        if up:
            assert lease_ok, "services running on a step whose lease was not live"


def test_a_database_beyond_repair_moves_only_to_a_healthy_sync_standby() -> None:
    active = {"term": 5, "leader": MINE, "services_up": True, "db_failure": "database: down"}
    moved = decide(obs(peers=UP, db_sync=frozenset({"c"}), **active))
    # Its database cannot run: there is no final position to hand over.
    assert moved.actions == (Handover("c", None, "database: down", False, db_lost=True),)
    sick = {"c": PeerView("standby", False), "b": PeerView("standby", True)}
    stays = decide(obs(peers=sick, db_sync=frozenset({"c"}), **active))
    assert stays.actions == (), "b may lack commits and c is not healthy: stay and repair"
    assert decide(obs(peers=UP, **active)).actions == (), "nobody recorded synchronous"


def test_an_operator_forces_a_node_that_may_lack_commits() -> None:
    assert decide(obs("b", db_eligible=False)).actions == ()
    forced = decide(obs("b", db_eligible=False, forced="b"))
    assert forced.actions == (Campaign(),) and "forces this node" in forced.reason
    assert decide(obs("b", db_eligible=False, forced="c")).actions == ()
    assert decide(obs("b", db_eligible=False, forced="b", paused=True)).actions == ()


NOT_C = frozenset({"a", "b"})


def test_a_node_not_acknowledged_as_a_member_waits() -> None:
    """c was added to the pair while its active (a) may be cut off from etcd: no peer
    shows a promise, yet c does not campaign; a member does, on the revision it read."""
    free = {"a": PeerView("active", True), "b": PeerView("standby", True)}
    waits = decide(obs("c", peers=free, members=NOT_C, members_revision=12))
    assert waits.actions == ()
    assert "not yet acknowledged as a member of the pair by its active" in waits.reason
    member = decide(obs("b", members=NOT_C, members_revision=12))
    assert member.actions == (Campaign(None, 12),)
    acknowledged = decide(obs("c", members=frozenset("abc"), members_revision=13))
    assert acknowledged.actions == (Campaign(None, 13),)
    # No member set yet (a pair elected before there was one): as before.
    assert decide(obs("c")).actions == (Campaign(None, 0),)
    # A member set that could not be read acknowledges nobody.
    assert decide(obs("a", members=frozenset(), members_revision=3)).actions == ()


def test_a_non_member_ahead_in_priority_is_not_waited_for() -> None:
    """b is preferred but not a member: it never campaigns, so c does not wait for it."""
    o = obs("c", peers={"b": PeerView("standby", True)}, members=frozenset("ac"))
    assert decide(o).actions == (Campaign(None, 0),)
    assert decide(replace(o, members=None)).actions == ()  # b may campaign first


def test_a_handover_target_campaigns_though_not_yet_a_member() -> None:
    """The active that named it stopped its services first: nobody holds the pair."""
    handover = HandoverView("c", "a", 20, seen_at=99.5)
    o = obs("c", members=NOT_C, members_revision=12, handover=handover)
    assert decide(o).actions == (Campaign(None, 12),)


def test_an_operator_may_force_a_node_not_acknowledged_as_a_member() -> None:
    forced = decide(obs("c", members=NOT_C, members_revision=12, forced="c"))
    assert forced.actions == (Campaign(None, 12),)
    assert "may still hold the pair cut off from etcd" in forced.reason
    plain = decide(obs("c", members=frozenset("abc"), forced="c"))
    assert "member" not in plain.reason


def test_an_active_cut_off_needs_the_promise_of_every_node_it_may_have_acknowledged() -> None:
    """Its topology's nodes, and those of a member set it wrote or may have written."""
    assert hold_peers(PAIR, "a", [None]) == {"b", "c"}
    assert hold_peers(PAIR, "a", [NOT_C]) == {"b", "c"}
    # d was dropped from the topology, but etcd may still list it: it may campaign.
    assert hold_peers(PAIR, "a", [frozenset("abd"), frozenset()]) == {"b", "c", "d"}
    assert hold_peers(PAIR, "a", [frozenset("abc"), frozenset("ae")]) == {"b", "c", "e"}


def test_a_terms_guard_needs_the_promise_of_every_node_that_may_take_it_over_by_beat() -> None:
    """Those of every member set etcd may hold; a node of the topology only once a set
    lists it (or while none is recorded: then every node may campaign)."""
    assert beat_peers(PAIR, "a", [None]) == {"b", "c"}
    assert beat_peers(PAIR, "a", [NOT_C]) == {"b"}, "c is not acknowledged yet"
    assert beat_peers(PAIR, "a", [NOT_C, frozenset("abc")]) == {"b", "c"}, "being written"
    assert beat_peers(PAIR, "a", [frozenset("abd")]) == {"b", "d"}
    assert beat_peers(PAIR, "a", [frozenset()]) == set()


def test_a_forced_node_not_acknowledged_as_a_member_takes_no_term_over_by_beat() -> None:
    """The active counts only its members' promises while they stand in for its beats:
    a node it never acknowledged may be free of any, and the active alive."""
    guard = TakeoverGuard(5, 40, 12)
    beat = obs(
        "c",
        members=NOT_C,
        members_revision=12,
        forced="c",
        leader=LeaderView("a", 5, LEASE),
        leader_absent_since=None,
        seen_leader=True,
        beat_takeover_at=99.0,
        beat_guard=guard,
    )
    waits = decide(beat)
    assert waits.actions == ()
    assert "not yet acknowledged as a member" in waits.reason
    # A member takes it over, forced or not; and the forced one campaigns once the key
    # is gone (the lease's rule).
    member = replace(beat, members=frozenset("abc"))
    assert decide(member).actions == (Campaign(None, 12, guard),)
    gone = obs("c", members=NOT_C, members_revision=12, forced="c")
    assert decide(gone).actions == (Campaign(None, 12),)


def test_a_refusal_that_rests_on_the_view_of_the_target_names_it() -> None:
    """The agent confirms such a refusal against etcd (its view of the nodes may lag)."""
    down = decide(
        obs(term=5, leader=MINE, services_up=True, peers={}, switchover=SwitchoverView("r", "b"))
    )
    assert down.actions == (RejectSwitchover("r", "b is down (no agent status)", "b"),)
    paused = decide(
        obs(
            term=5,
            leader=MINE,
            services_up=True,
            peers=UP,
            paused=True,
            switchover=SwitchoverView("r", "b"),
        )
    )
    assert [type(a) for a in paused.actions] == [RejectSwitchover]
    assert paused.actions[0].target is None  # type: ignore[union-attr]


DB_PAIR = PAIR.model_copy(
    update={
        "database": DatabaseConfig.model_validate(
            {
                "data_dir": "/var/lib/hapair/{pair.name}/pg",
                "auth": {
                    "superuser_password_file": "/etc/hapair/su.pw",
                    "replication_password_file": "/etc/hapair/repl.pw",
                },
            }
        )
    }
)


def test_a_forced_switch_of_a_database_pair_goes_only_to_a_recorded_synchronous_standby() -> None:
    """A standby not recorded synchronous may lack commits the active acknowledged
    alone: losing a critical resource must not hand the pair to it."""
    lost = {"plc:press-1": Lost(since=95.0, grace_s=2.0)}
    reaches = frozenset({"plc:press-1"})
    peers = {"b": PeerView("standby", True, reaches=reaches), "c": PeerView("standby", True)}
    o = obs(pair=DB_PAIR, term=5, leader=MINE, services_up=True, peers=peers, lost=lost)
    assert decide(o).actions == (), "b is not recorded synchronous: the active stays"
    degraded = replace(o, db_sync=frozenset())
    assert decide(degraded).actions == ()
    recorded = replace(o, db_sync=frozenset({"b"}))
    assert decide(recorded).actions == (
        Handover("b", None, "plc:press-1 lost on the active", planned=False),
    )
    asynchronous = DB_PAIR.model_copy(
        update={"database": DB_PAIR.database.model_copy(update={"synchronous": False})}  # type: ignore[union-attr]
    )
    assert decide(replace(o, pair=asynchronous)).actions == (
        Handover("b", None, "plc:press-1 lost on the active", planned=False),
    ), "an asynchronous database records no standby: its final position is handed over"


def test_an_unplanned_handover_is_taken_up_only_by_a_node_holding_every_commit() -> None:
    """The target of a handover campaigns only if it holds every acknowledged commit
    (recorded) or the handover carries the old primary's final position to reach."""

    def handover(lsn: int | None) -> HandoverView:
        return HandoverView("b", "a", 40, 99.5, planned=False, lsn=lsn, epoch=5)

    lacking = obs("b", pair=DB_PAIR, db_eligible=False, handover=handover(None))
    assert decide(lacking).actions == ()
    assert "lack" in decide(lacking).reason
    assert kinds(decide(replace(lacking, handover=handover(1234)))) == [Campaign]
    assert kinds(decide(replace(lacking, db_eligible=True))) == [Campaign]


def test_a_target_that_refused_a_handover_is_not_chosen_again_for_a_while() -> None:
    """A handover the target did not confirm is aborted; the next automatic one picks
    another standby, or none, instead of stopping the services again and again."""
    drained = obs(
        pair=DB_PAIR, term=5, leader=MINE, services_up=True, peers=UP, drained=frozenset({"a"})
    )
    assert decide(drained).actions == (Handover("b", None, "node drained"),)
    refused = replace(drained, refused=frozenset({"b"}))
    assert decide(refused).actions == (Handover("c", None, "node drained"),)
    assert decide(replace(drained, refused=frozenset({"b", "c"}))).actions == ()


@pytest.mark.parametrize(
    ("case", "changes", "renewable"),
    [
        ("current, healthy, every commit, bound by nobody", {}, True),
        ("a view that lags etcd", {"synced": False}, False),
        ("unhealthy", {"healthy": False}, False),
        ("may lack committed data", {"db_eligible": False}, False),
        ("promised a peer not to campaign", {"held_by": "b"}, False),
    ],
)
def test_its_own_key_is_renewable_only_by_a_node_that_would_win_the_new_term_at_once(
    case: str, changes: dict[str, Any], renewable: bool
) -> None:
    """A node whose term's beat the site changed gives the term up to itself only if its
    campaign would follow at once: otherwise the pair would wait without an active."""
    d = decide(obs(leader=MINE, **changes))
    assert d.actions == (Adopt(MINE.epoch, renewable),), case
