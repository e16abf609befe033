"""Which nodes of a pair may take it over, and whose promise a hold needs.

Pure rules over an :class:`Observation`, shared by the decision's branches (a
switchover, a drain, a lost resource, a failed database, a failback, a campaign): a
standby must be up, healthy, not drained and not tagged ``no_failover``; an unplanned
handover goes only to a node holding every acknowledged commit; only an acknowledged
member may campaign.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def best_standby(o: Observation, refused: frozenset[str] = frozenset()) -> str | None:
    """The first node in priority order that could take over now."""
    return next(
        (
            n.name
            for n in o.pair.nodes
            if n.name != o.me and n.name not in refused and eligible_peer(o, n.name)
        ),
        None,
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
