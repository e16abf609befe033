"""Operator operations, shared by the CLI and the registry's admin routes.

Each operation reads the site, validates the request against it and refuses with an
:class:`AdminError` before anything is written. The write is one transaction guarded by
what was validated (the leader's epoch, the pause and drain flags), together with the
event that records it, so a request judged against a state that changed meanwhile is
refused too, never half applied. :class:`~shared.store.StoreError` passes through: the
caller tells "etcd unreachable" apart from "refused".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hapair.shared import drift, keys, records
from hapair.shared.store import Store
from hapair.shared.topology import Pair, Site
from hapair.shared.txn import Compare, Op
from hapair.shared.view import SiteView

# A request the active never consumed (it died first) must not block the next one.
PENDING_STALE_S = 30.0


class AdminError(Exception):
    """The operation was refused; the message says why. Nothing was changed."""


@dataclass(frozen=True, slots=True)
class DrainResult:
    drained: records.Drained
    pair: str | None
    switchover: records.Switchover | None
    epoch: int | None = None
    """The epoch of the node's term when it was drained while active."""


def writer(store: Store) -> str:
    """Whom this client's events are filed under: its etcd user (its certificate's CN),
    the only one etcd's roles let it write; ``operator`` in the lab mode."""
    return store.identity or "operator"


class _Stamps:
    """Event keys of one writer that stay distinct and ordered within one transaction."""

    def __init__(self, store: Store) -> None:
        self._writer = writer(store)
        self._last = 0

    def op(self, event: records.Event) -> Op:
        self._last = max(time.time_ns(), self._last + 1)
        return Op.put(keys.event(self._last, self._writer), event.encode())


async def emit_event(store: Store, event: records.Event) -> None:
    await store.put(keys.event(time.time_ns(), writer(store)), event.encode())


async def prune_events(store: Store, older_than_s: float) -> int:
    """Delete events older than ``older_than_s``: within each writer's keys they sort by
    time, so one range per writer (and one for keys of the earlier layout)."""
    cutoff_ns = time.time_ns() - int(older_than_s * 1e9)
    kvs, _ = await store.get_prefix(keys.EVENTS_PREFIX, keys_only=True)
    deleted = 0
    for name in sorted({keys.event_writer(kv.key) for kv in kvs}):
        deleted += await store.delete_range(*keys.events_before(name, cutoff_ns))
    return deleted


async def load_view(store: Store) -> SiteView:
    """The topology, pairs and nodes at one revision (events and endpoints left out:
    no operation needs them and the event log can be long)."""
    # Key order: endpoints, events, nodes, pairs, topology; one range from nodes on.
    kvs, revision = await store.get_range(keys.NODES_PREFIX, keys.PREFIX + "0")
    return SiteView.from_kvs(kvs, revision=revision)


def _site(view: SiteView) -> Site:
    if view.site is not None:
        return view.site
    if view.topology is None and not any(p.key == keys.TOPOLOGY for p in view.problems):
        raise AdminError("no topology has been applied yet: run `hapair topology apply FILE`")
    raise AdminError("the topology stored in etcd is invalid: apply a valid site file")


def pair_of(view: SiteView, name: str) -> Pair:
    """``name``'s pair in the site; :class:`AdminError` naming the pairs if none."""
    return _pair(view, name)


def stamped(store: Store, event: records.Event) -> Op:
    """The op that files ``event`` under this client's events, for a transaction."""
    return _Stamps(store).op(event)


def _pair(view: SiteView, name: str) -> Pair:
    pair = _site(view).pair(name)
    if pair is None:
        known = ", ".join(p.name for p in _site(view).pairs()) or "none"
        raise AdminError(f"no pair named {name!r} in the topology (pairs: {known})")
    return pair


def _mod(view: SiteView, key: str) -> int:
    parsed = view.memo.get(key)
    return parsed.mod_revision if parsed is not None else 0


# ---- topology ---------------------------------------------------------------------


async def apply_topology(store: Store, site: Site, by: str) -> records.TopologyDoc:
    doc = records.TopologyDoc(site=site.model_dump(mode="json"), applied_by=by)
    event = records.Event(
        kind="topology_applied",
        reason=f"site {site.site} applied by {by}",
        details={"site": site.site, "by": by, "pairs": [p.name for p in site.pairs()]},
    )
    await store.txn([], [Op.put(keys.TOPOLOGY, doc.encode()), _Stamps(store).op(event)])
    return doc


async def read_topology(store: Store) -> tuple[records.TopologyDoc, Site]:
    kv = await store.get(keys.TOPOLOGY)
    if kv is None:
        raise AdminError("no topology has been applied yet: run `hapair topology apply FILE`")
    view = SiteView.from_kvs([kv])
    if view.site is None or view.topology is None:
        lines = "; ".join(p.problem for p in view.problems)
        raise AdminError(f"the topology stored in etcd is invalid: {lines}")
    return view.topology, view.site


# ---- switchover -------------------------------------------------------------------


def _switchover_guards(view: SiteView, pair: Pair, to: str | None) -> list[Compare]:
    """Validate a switchover of ``pair``; the compares that keep that judgement true."""
    leader = view.leaders.get(pair.name)
    if leader is None:
        raise AdminError(f"pair {pair.name} has no active node to switch over from")
    if pair.name in view.paused:
        raise AdminError(f"pair {pair.name} is paused; resume it first")
    ready = [n.name for n in view.eligible_standbys(pair)]
    if to is not None:
        why = view.cannot_take_over(pair, to) or _drift_refusal(view, pair, leader.node, to)
        if why is not None:
            raise AdminError(f"cannot switch pair {pair.name} over to {to}: {why}")
    elif not ready:
        reasons = "; ".join(
            view.cannot_take_over(pair, n.name) or f"{n.name} is no_failover"
            for n in pair.nodes
            if n.name != leader.node
        )
        raise AdminError(f"pair {pair.name} has no standby ready to take over ({reasons})")
    else:
        # The agent picks a standby that holds every declared package version first.
        best = min(ready, key=lambda n: bool(view.lacks(pair, n)))
        why = _drift_refusal(view, pair, leader.node, best)
        if why is not None:
            raise AdminError(
                f"pair {pair.name} has no standby that holds every package version the "
                f"site names: {why}"
            )
    pending = view.switchovers.get(pair.name)
    if pending is not None and time.time() - pending.at < PENDING_STALE_S:
        raise AdminError(
            f"a switchover of pair {pair.name} is already pending "
            f"(request {pending.id} by {pending.by}); wait for it to finish"
        )
    guards = [
        Compare.created(keys.leader(pair.name), leader.epoch),
        Compare.absent(keys.paused(pair.name)),
        Compare.modified(keys.switchover(pair.name), _mod(view, keys.switchover(pair.name))),
    ]
    if to is not None:
        guards.append(Compare.absent(keys.drained(to)))
    return guards


def _drift_refusal(view: SiteView, pair: Pair, active: str, target: str) -> str | None:
    """Why the planned move from ``active`` to ``target`` is refused for its packages
    (the rule the active applies, ``workshop_agent/candidates.py``)."""
    others = [active, *(n.name for n in view.eligible_standbys(pair))]
    lacks = {n: view.lacks(pair, n) for n in {target, *others}}
    return drift.planned_refusal(pair, target, lacks, others)


def _switchover_ops(
    view: SiteView, pair: Pair, request: records.Switchover, stamps: _Stamps
) -> list[Op]:
    leader = view.leaders[pair.name]
    event = records.Event(
        kind="switchover_requested",
        pair=pair.name,
        node=leader.node,
        epoch=leader.epoch,
        reason=request.reason or "operator request",
        details={"request": request.id, "to": request.to, "by": request.by},
    )
    return [
        Op.put(keys.switchover(pair.name), request.encode()),
        stamps.op(event),
    ]


async def _commit(store: Store, guards: list[Compare], ops: list[Op], what: str) -> None:
    result = await store.txn(guards, ops)
    if not result.succeeded:
        raise AdminError(
            f"{what} changed while the request was written; nothing was changed, try again"
        )


async def request_switchover(
    store: Store, pair: str, to: str | None, by: str, reason: str = ""
) -> records.Switchover:
    view = await load_view(store)
    found = _pair(view, pair)
    guards = _switchover_guards(view, found, to)
    request = records.Switchover(to=to, by=by, reason=reason)
    await _commit(
        store,
        guards,
        _switchover_ops(view, found, request, _Stamps(store)),
        f"the state of pair {pair}",
    )
    return request


# ---- forced takeover ----------------------------------------------------------------

TAKEOVER_VALID_S = 60


@dataclass(frozen=True, slots=True)
class TakeoverRisk:
    """What forcing ``node`` to take the pair over may cost, from the sync record."""

    pair: str
    node: str
    sync: records.SyncState | None
    members: frozenset[str] | None = None  # the nodes the pair's last active acknowledged

    @property
    def quorum(self) -> bool:
        """``node`` is one of several recorded standbys (quorum commit, ``ANY 1``): each
        commit is on one of them at least, not necessarily on this one."""
        sync = self.sync
        return sync is not None and self.node != sync.primary and len(sync.sync) >= 2

    @property
    def may_lose_commits(self) -> bool:
        sync = self.sync
        return sync is not None and (not sync.holds_everything(self.node) or self.quorum)

    def warning(self) -> str | None:
        found = [w for w in (self._commits(), self._membership()) if w is not None]
        return " ".join(found) or None

    def _commits(self) -> str | None:
        sync = self.sync
        if sync is None or not self.may_lose_commits:
            return None
        if self.quorum:
            others = ", ".join(n for n in sync.sync if n != self.node)
            return (
                f"{self.node} is one of the standbys recorded for pair {self.pair} under "
                f"quorum commit ({', '.join(sync.sync)}: each commit waited for any one of "
                f"them). A commit acknowledged by {others} alone is missing on {self.node} "
                f"unless it received at least as much, and is lost for good once "
                f"{sync.primary} and {others} rejoin as its standbys."
            )
        holders = ", ".join([sync.primary, *sync.sync])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sync.at))
        state = "asynchronous (degraded)" if sync.degraded else "synchronous"
        return (
            f"{self.node} is not recorded as holding every acknowledged commit of pair "
            f"{self.pair}: since {since} only {holders} do (the primary, {state}). Commits "
            f"acknowledged after {self.node} stopped receiving them are missing there, and "
            f"they are lost for good once {sync.primary} rejoins as its standby."
        )

    def _membership(self) -> str | None:
        if self.members is None or self.node in self.members:
            return None
        known = ", ".join(sorted(self.members)) or "no node"
        return (
            f"{self.node} is not yet acknowledged as a member of pair {self.pair} by its "
            f"last active (acknowledged: {known}). If that active is cut off from etcd, it "
            f"may still run the pair's services on the promises of those nodes, and would "
            f"run them together with {self.node}."
        )


async def takeover_risk(store: Store, pair: str, node: str) -> TakeoverRisk:
    """Check that ``node`` could be forced to take ``pair`` over, and say what it risks."""
    _, risk = await _takeover_checked(store, pair, node)
    return risk


async def _takeover_checked(
    store: Store, pair: str, node: str
) -> tuple[list[Compare], TakeoverRisk]:
    view = await load_view(store)
    guards = _takeover_guards(view, _pair(view, pair), node)
    kv = await store.get(keys.sync_standby(pair))
    sync = None
    if kv is not None:
        try:
            sync = records.decode(records.SyncState, kv.value, kv.key)
        except records.RecordError as err:
            raise AdminError(f"the sync record of pair {pair} is unreadable: {err}") from None
    # The warning is the one for this sync record: refuse if it changes meanwhile.
    guards.append(Compare.modified(keys.sync_standby(pair), kv.mod_revision if kv else 0))
    kv = await store.get(keys.members(pair))
    members = None
    if kv is not None:
        try:
            found = records.decode(records.Members, kv.value, kv.key).nodes
        except records.RecordError:
            found = []  # unreadable: it acknowledges nobody (as the agents read it)
        members = frozenset(found)
    # And for this member set.
    guards.append(Compare.modified(keys.members(pair), kv.mod_revision if kv else 0))
    return guards, TakeoverRisk(pair, node, sync, members)


def _takeover_guards(view: SiteView, pair: Pair, node: str) -> list[Compare]:
    leader = view.leaders.get(pair.name)
    if leader is not None:
        raise AdminError(
            f"pair {pair.name} has an active node ({leader.node}, epoch {leader.epoch}): "
            "use hapair switchover"
        )
    if pair.name in view.paused:
        raise AdminError(f"pair {pair.name} is paused; resume it first")
    why = view.cannot_take_over(pair, node)
    if why is not None:
        raise AdminError(f"cannot force {node} to take pair {pair.name} over: {why}")
    return [
        Compare.absent(keys.leader(pair.name)),
        Compare.absent(keys.paused(pair.name)),
        Compare.absent(keys.drained(node)),
    ]


async def force_takeover(
    store: Store, pair: str, node: str, by: str, reason: str = ""
) -> records.Takeover:
    """Make ``node`` campaign for a pair with no active node even if it may lack
    acknowledged commits. The request lapses after ``TAKEOVER_VALID_S`` if unused."""
    guards, risk = await _takeover_checked(store, pair, node)
    request = records.Takeover(to=node, by=by, reason=reason)
    event = records.Event(
        kind="takeover_forced",
        pair=pair,
        node=node,
        reason=reason or f"forced by {by}",
        details={"by": by, "request": request.id, "warning": risk.warning()},
    )
    lease = await store.grant(TAKEOVER_VALID_S)
    await _commit(
        store,
        guards,
        [
            Op.put(keys.takeover(pair), request.encode(), lease=lease),
            _Stamps(store).op(event),
        ],
        f"the state of pair {pair}",
    )
    return request


# ---- pause and resume -------------------------------------------------------------


async def pause(store: Store, pair: str, by: str, reason: str = "") -> records.Paused:
    view = await load_view(store)
    _pair(view, pair)
    current = view.paused.get(pair)
    if current is not None:
        raise AdminError(f"pair {pair} is already paused (by {current.by})")
    flag = records.Paused(by=by, reason=reason)
    event = records.Event(kind="paused", pair=pair, reason=reason, details={"by": by})
    key = keys.paused(pair)
    await _commit(
        store,
        [Compare.modified(key, _mod(view, key))],
        [Op.put(key, flag.encode()), _Stamps(store).op(event)],
        f"the pause flag of pair {pair}",
    )
    return flag


async def resume(store: Store, pair: str, by: str) -> records.Paused:
    """Lift a pause; works for a pair no longer in the topology, to clean up."""
    view = await load_view(store)
    current = view.paused.get(pair)
    if current is None:
        if view.site is not None:
            _pair(view, pair)
        raise AdminError(f"pair {pair} is not paused")
    event = records.Event(kind="resumed", pair=pair, details={"by": by})
    key = keys.paused(pair)
    await _commit(
        store,
        [Compare.modified(key, _mod(view, key))],
        [Op.delete(key), _Stamps(store).op(event)],
        f"the pause flag of pair {pair}",
    )
    return current


# ---- acknowledge a recovery -------------------------------------------------------


async def ack(store: Store, pair: str, epoch: int | None, by: str) -> records.Recovery:
    """Acknowledge the recovery of ``pair`` for ``epoch`` (the current one if None): its
    held services start. An ack for another epoch is refused; a second one changes
    nothing and says so."""
    view = await load_view(store)
    _pair(view, pair)
    current = view.recoveries.get(pair)
    if current is None:
        raise AdminError(f"pair {pair} has no recovery awaiting an operator")
    if epoch is not None and epoch != current.epoch:
        raise AdminError(
            f"pair {pair} awaits an acknowledgement for epoch {current.epoch}, not {epoch}: "
            "refused (check what happened with hapair status)"
        )
    leader = view.leaders.get(pair)
    if leader is None or leader.epoch != current.epoch:
        now = "no active node" if leader is None else f"epoch {leader.epoch}"
        raise AdminError(
            f"the recovery of pair {pair} is for epoch {current.epoch}, but the pair is at "
            f"{now}: refused"
        )
    if current.state == "acknowledged":
        raise AdminError(
            f"the recovery of pair {pair} at epoch {current.epoch} was already acknowledged "
            f"by {current.acked_by}; nothing changed"
        )
    done = current.model_copy(
        update={"state": "acknowledged", "acked_by": by, "acked_at": records.now_wall()}
    )
    event = records.Event(
        kind="ack",
        pair=pair,
        epoch=current.epoch,
        reason=f"acknowledged by {by}",
        details={"by": by, "held": current.held},
    )
    key = keys.recovery(pair)
    await _commit(
        store,
        [Compare.modified(key, _mod(view, key))],
        [Op.put(key, done.encode()), _Stamps(store).op(event)],
        f"the recovery of pair {pair}",
    )
    return done


# ---- drain and undrain ------------------------------------------------------------


async def drain(store: Store, node: str, by: str, reason: str = "") -> DrainResult:
    """Make ``node`` ineligible; if it is active, request a switchover away in the same
    transaction, and refuse both if no standby could take over."""
    view = await load_view(store)
    pair = _site(view).pair_of_node(node)
    if pair is None:
        raise AdminError(f"no node named {node!r} in the topology")
    current = view.drained.get(node)
    if current is not None:
        raise AdminError(f"node {node} is already drained (by {current.by})")
    flag = records.Drained(by=by, reason=reason)
    stamps = _Stamps(store)
    key = keys.drained(node)
    guards = [Compare.absent(key)]
    ops = [
        Op.put(key, flag.encode()),
        stamps.op(
            records.Event(
                kind="drained", pair=pair.name, node=node, reason=reason, details={"by": by}
            )
        ),
    ]
    request, epoch = None, None
    leader = view.leaders.get(pair.name)
    if leader is not None and leader.node == node:
        try:
            guards += _switchover_guards(view, pair, None)
        except AdminError as err:
            raise AdminError(
                f"cannot drain {node}: it is active in pair {pair.name} and cannot hand over: {err}"
            ) from None
        request, epoch = records.Switchover(by=by, reason="drain"), leader.epoch
        ops += _switchover_ops(view, pair, request, stamps)
    await _commit(store, guards, ops, f"the state of pair {pair.name}")
    return DrainResult(drained=flag, pair=pair.name, switchover=request, epoch=epoch)


async def undrain(store: Store, node: str, by: str) -> records.Drained:
    view = await load_view(store)
    current = view.drained.get(node)
    if current is None:
        if view.site is not None and view.site.pair_of_node(node) is None:
            raise AdminError(f"no node named {node!r} in the topology")
        raise AdminError(f"node {node} is not drained")
    pair = view.site.pair_of_node(node) if view.site is not None else None
    event = records.Event(
        kind="undrained", pair=pair.name if pair else None, node=node, details={"by": by}
    )
    key = keys.drained(node)
    await _commit(
        store,
        [Compare.modified(key, _mod(view, key))],
        [Op.delete(key), _Stamps(store).op(event)],
        f"the drain flag of node {node}",
    )
    return current
