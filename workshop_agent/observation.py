"""What the agent observes of its pair: the input of the decision (``decide.py``).

Frozen values, built by ``observe.py`` from the mirrored etcd keys and by the agent from
its own state; the decision reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hapair.shared.topology import Pair
from hapair.workshop_agent.term_beat import TakeoverGuard


@dataclass(frozen=True, slots=True)
class LeaderView:
    node: str
    epoch: int
    lease: int


@dataclass(frozen=True, slots=True)
class PeerView:
    """Another node of the pair, from its status record (absent = agent down)."""

    role: str
    healthy: bool
    healthy_since: float | None = None
    reaches: frozenset[str] = frozenset()
    held_by: str | None = None
    """The active this peer promised not to campaign against (see ``hold.py``)."""
    lacks: tuple[str, ...] = ()
    """The services whose declared package version it does not hold, by its status
    (``shared/drift.py``): it takes the pair over only when no node holding them can."""


@dataclass(frozen=True, slots=True)
class Lost:
    """A critical resource (a PLC, the database) this node's services cannot reach."""

    since: float
    grace_s: float


@dataclass(frozen=True, slots=True)
class SwitchoverView:
    request: str
    to: str | None


@dataclass(frozen=True, slots=True)
class HandoverView:
    to: str
    from_node: str
    revision: int
    seen_at: float
    planned: bool = True
    lsn: int | None = None
    epoch: int = 0  # the term its writer stepped down from
    request: str | None = None  # why (``reclaim``, ``new term beat``, a switchover's id)


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    me: str
    pair: Pair
    synced: bool
    lease: int | None
    lease_ok: bool
    leader: LeaderView | None
    leader_absent_since: float | None
    term: int | None
    services_up: bool
    failure: str | None
    healthy: bool
    holdoff_until: float
    started_at: float
    peers: Mapping[str, PeerView] = field(default_factory=dict)
    paused: bool = False
    drained: frozenset[str] = frozenset()
    switchover: SwitchoverView | None = None
    handover: HandoverView | None = None
    lost: Mapping[str, Lost] = field(default_factory=dict)
    db_eligible: bool = True
    """Without a database, or holding every acknowledged commit (the recorded primary or
    synchronous standby): only then may this node take over automatically."""
    seen_leader: bool = False
    """This agent has seen an active node since it started (so this is no cold start)."""
    db_failure: str | None = None
    """The active's database cannot be kept running (its repair budget is spent)."""
    db_sync: frozenset[str] = frozenset()
    """The other nodes recorded as holding every acknowledged commit (the synchronous
    standbys; the recorded primary too, while this node has not recorded itself)."""
    forced: str | None = None
    """An operator forces this node to take the pair over though it may lack commits."""
    held_by: str | None = None
    """An active that cannot reach etcd holds the pair over the peer path, and this node
    promised it not to campaign meanwhile (see ``hold.py``)."""
    left_term: int | None = None
    """The newest term this node gave up with a step-down transaction. A leader key of
    that term (or older) naming this node is a lagging view or a step-down etcd has not
    answered: it is never taken up again."""
    step_down_unanswered: bool = False
    """etcd did not answer that step-down: whether it was applied is unknown."""
    forgotten_promises_until: float = -float("inf")
    """A promise not to campaign that an earlier run of this agent gave over the peer
    path is forgotten at a restart; it has run out by then."""
    refused: frozenset[str] = frozenset()
    """Standbys that lately did not confirm a handover (they did not reach the old
    primary's final position): not chosen again for an automatic one for a while."""
    members: frozenset[str] | None = None
    """The nodes of the pair its last active acknowledged (``keys.members``), read from
    the same watch as the leader key. Only they may campaign: an active cut off from
    etcd holds the pair on their promises alone. None: no member set was ever written
    (a pair elected before there was one), every node may campaign."""
    members_revision: int = 0
    """The mod revision of that member set (0: none); a campaign loses if it changed."""
    lacks: tuple[str, ...] = ()
    """The services whose declared package version this node does not hold (its own
    disk): it is chosen only when no node holding every one can take over."""
    lease_ok_until: float = float("inf")
    """When ``lease_ok`` turns false with no news: the fence point (the lease's and the
    holds'; a term beat's, which moves on twenty times a second, wakes the loop through
    the fence timer when it passes)."""
    view_expires_at: float = float("inf")
    """The first instant at which a part of this view that the agent reckons from its
    clock runs out with no news: a target's refusal forgiven (``refused``), a promise run
    out (``held_by``)."""

    beat_takeover_at: float = float("inf")
    """When this standby may end the active's term because its term beats stopped
    (``term_beat.py``; ``inf``: not by beats), a promise not to take over included."""
    beat_guard: TakeoverGuard | None = None
    """What that takeover compares: the term, the beat measured from, and the member
    set, synchronous standby record and pause this view read."""

    @property
    def lease_ttl(self) -> float:
        return self.pair.failover.lease_ttl_s
