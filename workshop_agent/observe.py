"""Turn the mirrored etcd keys into the decision's view of one pair.

The only state kept here is *when* things were first seen on the local monotonic clock
(leader gone since, handover seen at, peer healthy since): the decision compares those
times with its own delays, and clocks of other servers are never compared with ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hapair.shared import drift, keys
from hapair.shared.log import EventLog
from hapair.shared.records import (
    HandoverRecord,
    Leader,
    Members,
    NodeStatus,
    R,
    RecordError,
    ResourceReport,
    Switchover,
    Takeover,
    decode_shared,
)
from hapair.shared.store import Kv
from hapair.shared.topology import Pair
from hapair.workshop_agent.observation import (
    HandoverView,
    LeaderView,
    Lost,
    PeerView,
    SwitchoverView,
)

INVALID = "<invalid value>"


@dataclass(frozen=True, slots=True)
class PairState:
    leader: LeaderView | None
    leader_absent_since: float | None
    peers: dict[str, PeerView]
    paused: bool
    drained: frozenset[str]
    switchover: SwitchoverView | None
    switchover_raw: bytes | None
    handover: HandoverView | None
    lost: dict[str, Lost]
    forced: str | None = None  # the node an operator forces to take the pair over
    members: frozenset[str] | None = None  # the nodes its active acknowledged (None: never)
    members_revision: int = 0


class PairObserver:
    def __init__(self, me: str, log: EventLog) -> None:
        self.me = me
        self.log = log
        self._absent_since: float | None = None
        self._handover_seen: tuple[int, float] | None = None
        self._healthy_since: dict[str, float] = {}
        self._warned: set[tuple[str, int]] = set()
        self._lost_since: dict[str, float] = {}

    def _decode(self, model: type[R], kv: Kv) -> R | None:
        try:
            return decode_shared(model, kv.value, kv.key)
        except RecordError as err:
            if (kv.key, kv.mod_revision) not in self._warned:
                self._warned.add((kv.key, kv.mod_revision))
                self.log.warning(
                    "ignoring invalid value in etcd", key=kv.key, problem="; ".join(err.problems)
                )
            return None

    def observe(
        self, pair: Pair, pairs: Mapping[str, Kv], nodes: Mapping[str, Kv], now: float
    ) -> PairState:
        leader = self._leader(pairs.get(keys.leader(pair.name)))
        if leader is None:
            self._absent_since = self._absent_since if self._absent_since is not None else now
        else:
            self._absent_since = None
        peers = {}
        for n in pair.nodes:
            kv = nodes.get(keys.node_status(n.name))
            status = self._decode(NodeStatus, kv) if kv is not None else None
            if n.name == self.me or status is None:
                self._healthy_since.pop(n.name, None)
                continue
            if status.healthy and status.role == "standby":
                self._healthy_since.setdefault(n.name, now)
            else:
                self._healthy_since.pop(n.name, None)
            reaches = frozenset(
                name
                for report in self._reports(n.name, nodes)
                for name, r in report.resources.items()
                if r.ok
            )
            peers[n.name] = PeerView(
                status.role,
                status.healthy,
                self._healthy_since.get(n.name),
                reaches,
                status.held_by,
                # Only what its status says it holds: an older agent that publishes no
                # packages holds none of them.
                drift.lacking(pair, drift.held(status.packages)),
            )
        drained = frozenset(n.name for n in pair.nodes if keys.drained(n.name) in nodes)
        switchover, raw = self._switchover(pairs.get(keys.switchover(pair.name)))
        members, members_revision = self.members(pair.name, pairs)
        return PairState(
            leader=leader,
            leader_absent_since=self._absent_since,
            peers=peers,
            # A paused key we cannot read still means an operator asked for a pause.
            paused=keys.paused(pair.name) in pairs,
            drained=drained,
            switchover=switchover,
            switchover_raw=raw,
            handover=self._handover(pairs.get(keys.handover(pair.name)), now),
            lost=self._lost(nodes, now),
            forced=self._forced(pairs.get(keys.takeover(pair.name))),
            members=members,
            members_revision=members_revision,
        )

    def members(self, pair: str, pairs: Mapping[str, Kv]) -> tuple[frozenset[str] | None, int]:
        """The nodes the pair's active acknowledged (None: no member set), and the
        revision of that set (0: none)."""
        kv = pairs.get(keys.members(pair))
        if kv is None:
            return None, 0
        record = self._decode(Members, kv)
        # A member set we cannot read acknowledges nobody: only the active's rewrite of
        # it (or an operator's forced takeover) lets a node campaign again.
        nodes = frozenset(record.nodes) if record is not None else frozenset()
        return nodes, kv.mod_revision

    def _forced(self, kv: Kv | None) -> str | None:
        record = self._decode(Takeover, kv) if kv is not None else None
        return record.to if record is not None else None

    def _reports(self, node: str, nodes: Mapping[str, Kv]) -> list[ResourceReport]:
        prefix = keys.reports_prefix(node)
        found = (
            self._decode(ResourceReport, kv) for key, kv in nodes.items() if key.startswith(prefix)
        )
        return [r for r in found if r is not None]

    def _lost(self, nodes: Mapping[str, Kv], now: float) -> dict[str, Lost]:
        grace = {
            name: r.grace_s
            for report in self._reports(self.me, nodes)
            for name, r in report.resources.items()
            if r.critical and not r.ok
        }
        for name in set(self._lost_since) - set(grace):
            del self._lost_since[name]
        return {name: Lost(self._lost_since.setdefault(name, now), g) for name, g in grace.items()}

    def _leader(self, kv: Kv | None) -> LeaderView | None:
        if kv is None:
            return None
        record = self._decode(Leader, kv)
        # Garbage in the leader key still holds the key: nobody may campaign over it.
        node = record.node if record is not None else INVALID
        return LeaderView(node, kv.create_revision, kv.lease)

    def _switchover(self, kv: Kv | None) -> tuple[SwitchoverView | None, bytes | None]:
        if kv is None:
            return None, None
        record = self._decode(Switchover, kv)
        if record is None:
            return SwitchoverView(INVALID, INVALID), kv.value
        return SwitchoverView(record.id, record.to), kv.value

    def _handover(self, kv: Kv | None, now: float) -> HandoverView | None:
        if kv is None:
            self._handover_seen = None
            return None
        if self._handover_seen is None or self._handover_seen[0] != kv.mod_revision:
            self._handover_seen = (kv.mod_revision, now)
        record = self._decode(HandoverRecord, kv)
        to = record.to if record is not None else INVALID
        from_node = record.from_node if record is not None else INVALID
        planned = record.planned if record is not None else False
        lsn = record.lsn if record is not None else None
        epoch = record.epoch if record is not None else 0
        request = record.request if record is not None else None
        return HandoverView(
            to, from_node, kv.mod_revision, self._handover_seen[1], planned, lsn, epoch, request
        )
