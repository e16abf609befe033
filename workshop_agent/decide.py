"""The HA decision: a pure function from what the agent observes to what it must do.

No I/O, no awaiting, no clock reads: the loop in ``agent.py`` gathers an
:class:`Observation` (``observation.py``), calls :func:`decide`, logs the decision's
reason and carries out its actions. Which nodes may take the pair over is
``candidates.py``'s rule. Safety rules live here, where tables of cases and property
tests can reach them:

- services are started only with a live lease and a leader key that is ours;
- an active that cannot prove its lease, or sees the leader key name anyone else,
  stops its services at once (fences);
- an active steps down by stopping its services first and deleting its key after;
  once it has sent that deletion, the term is over whatever etcd answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hapair.workshop_agent.candidates import (
    best_standby,
    drift_refusal,
    eligible_peer,
    first_unplanned_target,
    holders_first,
    is_member,
    lacks,
)
from hapair.workshop_agent.observation import HandoverView, Observation, SwitchoverView
from hapair.workshop_agent.term_beat import TakeoverGuard

# ---- what it must do --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fence:
    """Stop active-only services at once (the lease or the leader key is not ours)."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartServices:
    epoch: int


@dataclass(frozen=True, slots=True)
class Campaign:
    """Create the leader key if absent; ``handover_revision`` is the stale handover we
    may ignore (the campaign fails if the handover record changed since)."""

    handover_revision: int | None = None
    members_revision: int = 0
    """The member set decided on: the campaign loses if it changed since."""
    beat: TakeoverGuard | None = None
    """First end the active's term, whose beats stopped, with this guard
    (``beat_election.py``); the campaign then follows as the handover's target."""


@dataclass(frozen=True, slots=True)
class Adopt:
    """The leader key is ours on our live lease but we hold no term: take it up.
    ``renewable``: this node would win a new term at once in its place (its view
    current, healthy, holding every commit, bound by no promise), which a term whose
    beat the site changed needs (``take_over.py``)."""

    epoch: int
    renewable: bool = False


@dataclass(frozen=True, slots=True)
class Reclaim:
    """The leader key names this node on a lease of an earlier run: take it back."""

    epoch: int
    lease: int


@dataclass(frozen=True, slots=True)
class SettleStepDown:
    """Send again the step-down from ``epoch`` that etcd did not answer. It is guarded
    by the epoch, so repeating one that etcd did apply changes nothing."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Resign:
    reason: str


@dataclass(frozen=True, slots=True)
class Handover:
    """Stop the services, hand the database's final position to ``to`` (aborting if it
    does not reach it), then give it the key. ``db_lost``: this node's database cannot
    run, so there is no final position; ``to`` is then a recorded synchronous standby."""

    to: str
    request: str | None
    reason: str
    planned: bool = True
    db_lost: bool = False


@dataclass(frozen=True, slots=True)
class RejectSwitchover:
    """Refuse a switchover. With ``target``, the refusal rests on what this node's view
    says of that node (down, unhealthy, drained; with ``lacks``, a declared package
    version it does not hold): that view comes from another watch than the request's
    and may lag it, so the agent confirms it against etcd first."""

    request: str
    reason: str
    target: str | None = None
    lacks: bool = False


Action = (
    Fence
    | StartServices
    | Campaign
    | Adopt
    | Reclaim
    | SettleStepDown
    | Resign
    | Handover
    | RejectSwitchover
)


@dataclass(frozen=True, slots=True)
class Decision:
    reason: str
    actions: tuple[Action, ...] = ()


# ---- the decision -----------------------------------------------------------------


def decide(o: Observation) -> Decision:
    if not o.lease_ok:
        if o.term is not None or o.services_up:
            return Decision(
                "lease not confirmed in time: fencing",
                (Fence("lease not confirmed before the fence point"),),
            )
        return Decision("waiting for a lease")
    if o.term is not None:
        return _as_active(o, o.term)
    return _as_standby(o)


def _as_active(o: Observation, term: int) -> Decision:
    leader = o.leader
    if leader is None or (leader.node, leader.epoch, leader.lease) != (o.me, term, o.lease):
        held = "nobody" if leader is None else f"{leader.node} epoch {leader.epoch}"
        return Decision(
            f"leader key now held by {held}: fencing",
            (Fence(f"leadership lost (leader key: {held})"),),
        )
    if o.failure is not None and not o.paused:
        return Decision(f"resigning: {o.failure}", (Resign(o.failure),))
    if o.db_failure is not None and not o.paused:
        # Without a healthy synchronous standby the active stays and keeps repairing.
        moved = _database_switch(o, o.db_failure)
        if moved is not None:
            return moved
    if o.switchover is not None:
        return _switchover(o, o.switchover)
    if o.me in o.drained and not o.paused:
        target = best_standby(o, o.refused)
        if target is not None and drift_refusal(o, target) is None:
            return Decision(
                f"node drained: handing over to {target}", (Handover(target, None, "node drained"),)
            )
    forced = _forced_switch(o)
    if forced is not None:
        return forced
    failback = _failback_target(o)
    if failback is not None:
        return Decision(f"failback to {failback}", (Handover(failback, None, "failback"),))
    if not o.services_up:
        return Decision(f"active at epoch {term}: starting services", (StartServices(term),))
    return Decision(f"active at epoch {term}")


def _switchover(o: Observation, cmd: SwitchoverView) -> Decision:
    if o.paused:
        return _reject(cmd, "pair is paused; resume it first")
    if cmd.to is None:
        target = best_standby(o)
        if target is None:
            return _reject(cmd, "no standby is up, healthy and not drained")
        why = drift_refusal(o, target)
        if why is not None:
            return _reject(cmd, f"no standby holds every package version the site names: {why}")
        return Decision(f"switchover to {target}", (Handover(target, cmd.request, "switchover"),))
    if o.pair.node(cmd.to) is None:
        return _reject(cmd, f"{cmd.to} is not a node of pair {o.pair.name}")
    if cmd.to == o.me:
        return _reject(cmd, f"{cmd.to} is already active")
    if cmd.to in o.drained:
        return _reject(cmd, f"{cmd.to} is drained", cmd.to)
    peer = o.peers.get(cmd.to)
    if peer is None:
        return _reject(cmd, f"{cmd.to} is down (no agent status)", cmd.to)
    if not peer.healthy:
        return _reject(cmd, f"{cmd.to} is not healthy", cmd.to)
    why = drift_refusal(o, cmd.to)
    if why is not None:
        return _reject(cmd, why, cmd.to, lacks=True)
    return Decision(f"switchover to {cmd.to}", (Handover(cmd.to, cmd.request, "switchover"),))


def _reject(
    cmd: SwitchoverView, reason: str, target: str | None = None, lacks: bool = False
) -> Decision:
    return Decision(
        f"switchover refused: {reason}", (RejectSwitchover(cmd.request, reason, target, lacks),)
    )


def _forced_switch(o: Observation) -> Decision | None:
    """The application forces the switch: a critical resource lost here for its grace
    time moves the pair to the first standby that still reaches it. If none does, the
    fault is the resource's, not this node's: nobody moves."""
    if o.paused:
        return None
    for name, lost in sorted(o.lost.items()):
        if o.now - lost.since < lost.grace_s:
            continue
        target = first_unplanned_target(
            o,
            (n.name for n in o.pair.nodes if name in _reaches(o, n.name)),
        )
        if target is not None:
            return Decision(
                f"{name} lost on this node, {target} reaches it: handing over",
                (Handover(target, None, f"{name} lost on the active", False),),
            )
    return None


def _database_switch(o: Observation, failure: str) -> Decision | None:
    """A database that cannot be repaired here moves the pair only to a healthy standby
    recorded synchronous: any other would lose commits, and leaving would leave nothing.
    Its final position cannot be read, so none is handed over."""
    target = first_unplanned_target(o, (n.name for n in o.pair.nodes if n.name in o.db_sync))
    if target is None:
        return None
    return Decision(
        f"{failure}: handing over to the synchronous standby {target}",
        (Handover(target, None, failure, False, db_lost=True),),
    )


def _reaches(o: Observation, name: str) -> frozenset[str]:
    peer = o.peers.get(name)
    return peer.reaches if peer is not None else frozenset()


def _failback_target(o: Observation) -> str | None:
    policy = o.pair.failover
    if policy.failback != "auto" or o.paused:
        return None
    main = o.pair.nodes[0].name
    if main == o.me or main in o.refused or not eligible_peer(o, main):
        return None
    if drift_refusal(o, main) is not None:
        return None
    since = o.peers[main].healthy_since
    if since is None or o.now - since < policy.failback_after_s:
        return None
    return main


def _as_standby(o: Observation) -> Decision:
    if o.services_up:
        return Decision(
            "services running without a term: fencing",
            (Fence("active services running without a term"),),
        )
    leader = o.leader
    if leader is not None:
        if leader.node == o.me and o.left_term is not None and leader.epoch <= o.left_term:
            # Its services are stopped and the key is being given away: taking it up on
            # a view that may lag etcd would run them next to the node that took over.
            if o.step_down_unanswered:
                return Decision(
                    f"etcd did not answer the step-down from epoch {leader.epoch}: "
                    "sending it again",
                    (SettleStepDown(leader.epoch),),
                )
            return Decision(f"stepped down from epoch {leader.epoch}; waiting for etcd to show it")
        if leader.node == o.me and leader.lease == o.lease:
            renewable = o.synced and o.healthy and o.db_eligible and o.held_by is None
            return Decision(
                f"leader key is ours (epoch {leader.epoch}): taking it up",
                (Adopt(leader.epoch, renewable),),
            )
        if leader.node == o.me:
            return Decision(
                "leader key left by an earlier run of this node: reclaiming",
                (Reclaim(leader.epoch, leader.lease),),
            )
        beat = o.beat_guard
        if beat is not None and beat.epoch == leader.epoch and o.now >= o.beat_takeover_at:
            return _beat_takeover(o, leader.node, beat)
        return Decision(f"standby, {leader.node} active at epoch {leader.epoch}")
    return _campaign(o)


def _beat_takeover(o: Observation, active: str, beat: TakeoverGuard) -> Decision:
    """The active's term beats stopped (``term_beat.py``): its leader key stands until
    its lease runs out, but it has fenced, so the pair is taken over by the rules of a
    campaign, as if the key were gone since the takeover became due."""
    decision = _campaign(o, o.beat_takeover_at, beat)
    said = f"{active}'s term beats stopped (epoch {beat.epoch})"
    return Decision(decision.reason.replace(NO_ACTIVE, said, 1), decision.actions)


NO_ACTIVE = "no active node"
NEW_TERM_BEAT = "new term beat"  # a handover's request: a node renews its term (take_over.py)


def _campaign(
    o: Observation, absent_since: float | None = None, beat: TakeoverGuard | None = None
) -> Decision:
    if not o.synced:
        return Decision("no active node, but the view of etcd is not current: waiting")
    if o.held_by is not None:
        return Decision(
            f"no active node in etcd, but {o.held_by} holds the pair over the peer path "
            "(it cannot reach etcd) and this node promised not to campaign: waiting"
        )
    # A live handover finishes even in a paused pair: it is an operator's switchover
    # or this node's own restart, not an automatic failover.
    handover = o.handover
    handover_live = handover is not None and o.now - handover.seen_at < o.lease_ttl
    if handover is not None and handover_live:
        if handover.to != o.me:
            return Decision(f"handover to {handover.to} in progress: waiting")
        if not o.healthy:
            return Decision("handover to this node, but it is not healthy: waiting")
        if not o.db_eligible and handover.lsn is None:
            # Nothing to catch up with: promoting would lose what this node lacks. The
            # record goes stale and a node holding every commit takes over.
            return Decision(
                "handover to this node without the old primary's final position, and "
                "this node may lack committed data: not campaigning"
            )
        # The active that named this node stopped its services first: none holds the
        # pair, so this node needs no acknowledgement as a member.
        return Decision(
            "handover to this node: campaigning",
            (Campaign(members_revision=o.members_revision, beat=beat),),
        )
    # An active cut off from etcd holds the pair on the promises of the nodes it knows;
    # one added to the pair since then it never asks, so that node waits while any node
    # of the pair is bound by such a promise.
    holders = sorted({p.held_by for p in o.peers.values() if p.held_by} - {o.me})
    if holders:
        return Decision(
            f"no active node in etcd, but {', '.join(holders)} holds the pair over the "
            "peer path (other nodes promised it not to campaign): waiting"
        )
    if o.now < o.forgotten_promises_until:
        return Decision(
            "no active node; a promise not to campaign that the previous run of this "
            "agent may have given could still hold: waiting"
        )
    if o.paused:
        return Decision("no active node; pair paused: no automatic failover")
    node = o.pair.node(o.me)
    if node is None:
        return Decision("not a node of the pair")
    if node.no_failover:
        return Decision("no active node; this node is tagged no_failover")
    if o.me in o.drained:
        return Decision("no active node; this node is drained")
    if not o.healthy:
        return Decision("no active node; this node is not healthy")
    if o.now < o.holdoff_until:
        return Decision("no active node; holding off after stepping down")
    stale = handover.revision if handover is not None else None
    member = is_member(o, o.me)
    if o.forced == o.me and (member or beat is None):
        unacknowledged = (
            ""
            if member
            else " and that the active, not having acknowledged it as a member of the pair, "
            "may still hold the pair cut off from etcd"
        )
        return Decision(
            "no active node; an operator forces this node to take over, accepting that "
            f"it may lack committed data{unacknowledged}: campaigning",
            (Campaign(stale, o.members_revision, beat),),
        )
    if not member:
        # The last active may be cut off from etcd and hold the pair on the promises of
        # the members it knows; it never asked this node. Nor does a term's guard count
        # on this node's promises while its beats stay out of etcd (``beating.py``):
        # not even a forced node takes such a term over by beat.
        return Decision(
            "no active node; this node is not yet acknowledged as a member of the pair by "
            "its active (it may hold the pair cut off from etcd): not campaigning"
        )
    if not o.db_eligible:
        return Decision(
            "no active node; this node may lack committed data (not a recorded "
            "synchronous standby, or another recorded one received more or does not "
            "answer and may hold commits this node lacks): not campaigning"
        )
    rank = o.pair.rank(o.me)
    if rank > 0 and not o.seen_leader and o.now - o.started_at < 2 * o.lease_ttl:
        return Decision("no active node; giving the main server time to start")
    ahead, holders, delay = _preferred(o)
    if absent_since is None:
        absent_since = o.leader_absent_since if o.leader_absent_since is not None else o.now
    if o.now - absent_since < delay:
        if holders:
            return Decision(
                f"no active node; this node lacks the package version the site names of "
                f"{', '.join(o.lacks)}: {', '.join(holders)} may take over first"
            )
        return Decision(f"no active node; {len(ahead)} preferred node(s) may campaign first")
    if o.lacks:
        return Decision(
            "no active node, and no node holding every package version the site names "
            f"took over: campaigning without the version of {', '.join(o.lacks)}",
            (Campaign(stale, o.members_revision, beat),),
        )
    return Decision("no active node: campaigning", (Campaign(stale, o.members_revision, beat),))


def _preferred(o: Observation) -> tuple[list[str], list[str], float]:
    """The nodes that may campaign before this one, those of them holding every declared
    package version when this node lacks one, and how long after the leader key went
    away this node leaves them."""
    # Priority order, with the nodes holding every declared package version first.
    order = holders_first(o, (n.name for n in o.pair.nodes))
    ahead = [n for n in order[: order.index(o.me)] if eligible_peer(o, n) and is_member(o, n)]
    delay = len(ahead) * o.pair.failover.campaign_delay_s
    holders = [n for n in ahead if not lacks(o, n)] if o.lacks else []
    if holders:
        # A node that holds them gets a whole lease more to take over: this one only
        # steps in if none of them does (one that cannot campaign for a reason this view
        # does not show must not leave the pair without an active).
        delay += o.lease_ttl
    return ahead, holders, delay


# ---- when the decision is due again ------------------------------------------------


def due(o: Observation) -> float:
    """The first instant after ``o.now`` at which :func:`decide` may decide otherwise on
    the facts of ``o`` with no news (``inf``: none): the loop runs its next round by then,
    and at once on any news (a watch event, a health result, a command, a peer's message).

    Every comparison of the decision with ``o.now`` has its instant here; one more is
    harmless (a round that decides the same), one missing would delay that decision to
    the loop's longest wait. The fence point is among them, but the fence itself never
    waits for a round: its own timer fences (``fencing.py``)."""
    f = o.pair.failover
    instants = [
        o.lease_ok_until,
        o.view_expires_at,
        o.holdoff_until,
        o.forgotten_promises_until,
        o.started_at + 2 * o.lease_ttl,  # the main server's time to start
    ]
    if o.handover is not None:
        instants.append(o.handover.seen_at + o.lease_ttl)  # the handover record goes stale
    instants += [lost.since + lost.grace_s for lost in o.lost.values()]
    if f.failback == "auto":
        instants += [
            p.healthy_since + f.failback_after_s
            for p in o.peers.values()
            if p.healthy_since is not None
        ]
    if o.leader is None and o.leader_absent_since is not None and o.pair.node(o.me) is not None:
        instants.append(o.leader_absent_since + _preferred(o)[2])  # the preferred nodes' turn
    if o.beat_guard is not None and o.pair.node(o.me) is not None:
        instants.append(o.beat_takeover_at)  # the active's beats stopped
        instants.append(o.beat_takeover_at + _preferred(o)[2])
    return min((t for t in instants if t > o.now), default=math.inf)


# ---- what a won campaign is called ------------------------------------------------


def takeover_cause(
    me: str, previous: str | None, handover: HandoverView | None, forced: str | None
) -> str:
    """Why this node became active, in the words of its log and its election event.

    ``previous``: the last active this node saw; ``handover``: the live handover record
    when it campaigned; ``forced``: the node an operator forces to take over, if any."""
    target = handover is not None and handover.to == me
    if target and handover is not None and handover.from_node == me:
        if handover.request == NEW_TERM_BEAT:
            return "a new term for the pair's new term beat"
        return "took its pair back after an agent restart"
    if target and handover is not None and handover.planned:
        return "planned switchover"
    if forced == me:
        return f"takeover forced by an operator (failover from {previous})"
    if target and handover is not None:
        return f"switch forced by {handover.from_node}"
    if previous is not None and previous != me:
        return f"failover from {previous}"
    return "election"
