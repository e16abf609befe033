"""Which nodes of a pair may take it over, and whose promise a hold needs.

Pure rules over an :class:`Observation`, shared by the decision's branches (a
switchover, a drain, a lost resource, a failed database, a failback, a campaign): a
standby must be up, healthy, not drained and not tagged ``no_failover``; an unplanned
handover goes only to a node holding every acknowledged commit; only an acknowledged
member may campaign. Among those, a node that lacks a package version the site names
(drifted, ``shared/drift.py``) comes after every node that holds them all: it is chosen
only when none of those can take over, and a planned move never goes to it from a
node that holds them.
"""

from __future__ import annotations

from collections.abc import Iterable

from hapair.shared import drift
from hapair.shared.topology import Pair
from hapair.workshop_agent.observation import Observation


def eligible_peer(o: Observation, name: str) -> bool:
    """A standby that could take over. A peer still reporting itself active is the one
    stepping down (its status lags its leader key): it is never waited for."""
    peer = o.peers.get(name)
    node = o.pair.node(name)
    return (
        peer is not None
        and node is not None
        and peer.healthy
        and peer.role == "standby"
        and not node.no_failover
        and name not in o.drained
    )


def lacks(o: Observation, name: str) -> tuple[str, ...]:
    """The services whose declared package version ``name`` does not hold: this node's
    from its own disk, a peer's from its status (no status: it holds none)."""
    if name == o.me:
        return o.lacks
    peer = o.peers.get(name)
    return peer.lacks if peer is not None else tuple(sorted(drift.declared(o.pair)))


def holders_first(o: Observation, names: Iterable[str]) -> list[str]:
    """``names`` in their order, with the nodes that hold every declared package version
    before those that lack one."""
    ordered = list(names)
    return [n for n in ordered if not lacks(o, n)] + [n for n in ordered if lacks(o, n)]


def best_standby(o: Observation, refused: frozenset[str] = frozenset()) -> str | None:
    """The first node in priority order that could take over now, holding every declared
    package version if any such node can."""
    ready = (
        n.name
        for n in o.pair.nodes
        if n.name != o.me and n.name not in refused and eligible_peer(o, n.name)
    )
    return next(iter(holders_first(o, ready)), None)


def drift_refusal(o: Observation, target: str) -> str | None:
    """Why this active may not hand the pair to ``target`` in a planned move (a
    switchover, a drain, a failback): it lacks a declared package version while this
    node or another standby that could take over holds every one."""
    others = [o.me, *(n.name for n in o.pair.nodes if n.name != o.me and eligible_peer(o, n.name))]
    return drift.planned_refusal(
        o.pair, target, {n: lacks(o, n) for n in {target, *others}}, others
    )


def holds_every_commit(o: Observation, name: str) -> bool:
    """May ``name`` receive an unplanned handover? On a pair with a synchronous database,
    only a recorded synchronous standby holds every acknowledged commit; the old
    primary's final position is handed over too, but a standby that has not caught up
    may never reach it (and the active would stop for nothing)."""
    db = o.pair.database
    return db is None or not db.synchronous or name in o.db_sync


def unplanned_target(o: Observation, name: str) -> bool:
    """May ``name`` take an unplanned handover from this active (a resource lost here,
    a database that cannot be repaired)?"""
    return (
        name != o.me
        and name not in o.refused
        and eligible_peer(o, name)
        and holds_every_commit(o, name)
    )


def first_unplanned_target(o: Observation, names: Iterable[str]) -> str | None:
    """The first of ``names`` that may take an unplanned handover, holding every
    declared package version if any of them does."""
    return next(iter(holders_first(o, (n for n in names if unplanned_target(o, n)))), None)


def is_member(o: Observation, name: str) -> bool:
    """Has the pair's last active acknowledged ``name`` as a member (or none was ever
    recorded)?"""
    return o.members is None or name in o.members


def hold_peers(
    pair: Pair, me: str, acknowledged: Iterable[frozenset[str] | None]
) -> frozenset[str]:
    """The nodes an active cut off from etcd must have the promise of: every node of
    its topology, and every node of a member set it may have left in etcd (one it wrote,
    or is writing, for a topology that no longer lists them: they may still campaign)."""
    nodes = {n.name for n in pair.nodes}
    for members in acknowledged:
        nodes |= members or set()
    return frozenset(nodes - {me})


def beat_peers(
    pair: Pair, me: str, acknowledged: Iterable[frozenset[str] | None]
) -> frozenset[str]:
    """The nodes whose promises a term's guard needs when they stand in for its beats:
    those that may take the term over by beat, the nodes of every member set etcd may
    hold (the one shown, or one written and unanswered); with no member set, every node
    of the topology. A node of the topology not yet acknowledged may not (``decide.py``):
    the active beats in etcd before it writes a set that adds it (``members.py``)."""
    nodes: set[str] = set()
    for members in acknowledged:
        nodes |= {n.name for n in pair.nodes} if members is None else members
    return frozenset(nodes - {me})
