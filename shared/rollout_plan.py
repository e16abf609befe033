"""A rollout of a pair, as pure functions of the site's state: whether it may start
(and why not), its plan, and how each of its steps stands.

A rollout moves every copy of a pair's services onto the package versions the site
names, with no more interruption than one planned switchover:

1. wait until every node of the pair holds the declared versions;
2. restart the standbys' ``placement: all`` copies that run another version, and see
   them up;
3. switch over to the updated standby (a database pair's synchronous standby, as any
   switchover), whose active-only services start on the declared versions;
4. restart the old active's ``placement: all`` copies, now that it is a standby.

The orchestration (``rollout.py``) reads the state, asks these functions, and acts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hapair.shared import records
from hapair.shared.topology import Pair
from hapair.shared.view import SiteView

PENDING_STALE_S = 30.0  # as admin.PENDING_STALE_S: an unconsumed switchover request


@dataclass(frozen=True, slots=True)
class Plan:
    """What a rollout of ``pair`` will do, judged at ``epoch`` with ``active`` active."""

    pair: str
    active: str
    epoch: int
    target: str
    """The standby the pair switches over to."""
    standbys: tuple[str, ...]
    """Every standby that is up, the target last: each one's copies restart first."""
    declared: Mapping[str, str]
    """Each service from a package: the version the site names (``{version}-{sha12}``)."""
    shared: tuple[str, ...]
    """The ``placement: all`` services among them."""
    before: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Per node, the version each copy's process runs now: where a rollback goes."""

    def restart_on(self, node: str) -> tuple[str, ...]:
        """The ``placement: all`` copies on ``node`` that do not run the declared version."""
        now = self.before.get(node, {})
        return tuple(s for s in self.shared if now.get(s) != self.declared[s])

    def back_to(self, node: str, services: tuple[str, ...]) -> dict[str, str]:
        """The versions ``services`` ran on ``node`` before: a rollback's target (a copy
        that did not run before has none)."""
        now = self.before.get(node, {})
        return {s: now[s] for s in services if s in now}

    def pins_back(self, node: str, held: Mapping[str, frozenset[str]]) -> dict[str, str]:
        """What a rollback pins on ``node``, among the versions it ``held``: each
        service's version it ran before, or (an active-only service, which ran on the
        active only) the one the active ran; so a later start there does not bring the
        version rolled back from."""
        ran, active = self.before.get(node, {}), self.before.get(self.active, {})
        pins = {s: ran.get(s) or active.get(s) for s in self.declared}
        return {s: v for s, v in pins.items() if v is not None and v in held.get(s, ())}

    @property
    def up_to_date(self) -> bool:
        """Every copy runs the declared version already: nothing to restart or move."""
        active_only = [s for s in self.declared if s not in self.shared]
        return all(not self.restart_on(n) for n in (*self.standbys, self.active)) and all(
            self.before.get(self.active, {}).get(s) == self.declared[s] for s in active_only
        )

    def steps(self) -> list[str]:
        """The plan, one line per step, as printed before it runs (and by --dry-run)."""
        versions = ", ".join(f"{s} {v}" for s, v in sorted(self.declared.items()))
        out = [f"wait until every node of pair {self.pair} holds {versions}"]
        for node in self.standbys:
            restart = self.restart_on(node)
            if restart:
                out.append(f"restart {', '.join(restart)} on standby {node} and see them up")
        out.append(
            f"switch pair {self.pair} over from {self.active} to {self.target}, and see "
            "its services up on the declared versions"
        )
        restart = self.restart_on(self.active)
        if restart:
            out.append(f"restart {', '.join(restart)} on {self.active}, then a standby")
        return out


def _awaiting(view: SiteView, pair: str, epoch: int) -> records.Recovery | None:
    rec = view.recoveries.get(pair)
    return rec if rec is not None and rec.state == "awaiting" and rec.epoch == epoch else None


def refusal(view: SiteView, pair: Pair, sync: records.SyncState | None, now: float) -> str | None:
    """Why a rollout of ``pair`` may not start now, or None. ``sync``: the pair's
    synchronous standby record (database pairs); ``now``: the wall clock."""
    name = pair.name
    leader = view.leaders.get(name)
    if leader is None:
        return f"pair {name} has no active node"
    if name in view.paused:
        return f"pair {name} is paused; resume it first"
    rec = _awaiting(view, name, leader.epoch)
    if rec is not None:
        return (
            f"pair {name} awaits an operator's acknowledgement of its recovery at epoch "
            f"{rec.epoch} (hapair ack {name})"
        )
    pending = view.switchovers.get(name)
    if pending is not None and now - pending.at < PENDING_STALE_S:
        return f"a switchover of pair {name} is pending (request {pending.id})"
    if not any(s.package is not None for s in pair.services):
        return f"pair {name} runs no service from a package: nothing to roll out"
    if _target(view, pair, sync) is None:
        reasons = "; ".join(
            _why_not(view, pair, sync, n.name) or f"{n.name} is no_failover"
            for n in pair.nodes
            if n.name != leader.node
        )
        return f"pair {name} has no eligible standby to switch over to ({reasons or 'none'})"
    return None


def _why_not(view: SiteView, pair: Pair, sync: records.SyncState | None, node: str) -> str | None:
    why = view.cannot_take_over(pair, node)
    sync_only = pair.database is not None and sync is not None
    if why is None and sync_only and sync is not None and node not in sync.sync:
        return f"{node} is not the pair's synchronous database standby"
    return why


def _target(view: SiteView, pair: Pair, sync: records.SyncState | None) -> str | None:
    """The standby a switchover moves the pair to: the first eligible one in priority
    order (a database pair's: one that holds every commit)."""
    for node in pair.nodes:
        if not node.no_failover and _why_not(view, pair, sync, node.name) is None:
            return node.name
    return None


def running_versions(status: records.NodeStatus | None) -> dict[str, str]:
    """The version each service's running process is from, as its node reports it."""
    if status is None:
        return {}
    return {
        s.name: s.package
        for s in status.services
        if s.package is not None and s.state in ("running", "unhealthy", "starting")
    }


def make_plan(view: SiteView, pair: Pair, sync: records.SyncState | None) -> Plan:
    """The plan for ``pair`` (which :func:`refusal` accepted)."""
    leader = view.leaders[pair.name]
    target = _target(view, pair, sync)
    assert target is not None, "refusal() says when there is no standby"
    declared = {s.name: s.package.dir_name for s in pair.services if s.package is not None}
    shared = tuple(s.name for s in pair.services if s.package is not None and s.placement == "all")
    up = [
        n.name
        for n in pair.nodes
        if n.name not in (leader.node, target) and view.statuses.get(n.name) is not None
    ]
    nodes = (leader.node, *up, target)
    before = {n: running_versions(view.statuses.get(n)) for n in nodes}
    return Plan(
        pair=pair.name,
        active=leader.node,
        epoch=leader.epoch,
        target=target,
        standbys=(*up, target),
        declared=declared,
        shared=shared,
        before=before,
    )


def held(status: records.NodeStatus | None) -> dict[str, frozenset[str]]:
    """The package versions a node reports it holds, per service."""
    if status is None:
        return {}
    return {p.service: frozenset(p.installed) for p in status.packages}


def not_installed(view: SiteView, plan: Plan, nodes: tuple[str, ...]) -> list[str]:
    """What keeps step 1 waiting: per node, each declared version it does not hold yet
    (with why, when its last try failed). Empty: every node holds every one."""
    out = []
    for node in nodes:
        status = view.statuses.get(node)
        if status is None:
            out.append(f"{node} is down")
            continue
        held = {p.service: p for p in status.packages}
        for service, version in sorted(plan.declared.items()):
            p = held.get(service)
            if p is None or version not in p.installed:
                state = "not reported" if p is None else p.state
                why = f": {p.detail}" if p is not None and p.detail else ""
                out.append(f"{node}: {service} {version} {state}{why}")
    return out


def services_up(
    status: records.NodeStatus | None, versions: Mapping[str, str], services: tuple[str, ...]
) -> tuple[bool, str | None]:
    """Whether every one of ``services`` runs on this node, healthy, from the version in
    ``versions`` (True, None); not yet (False, None); or failed (False, why)."""
    if status is None:
        return False, "its agent is down"
    by_name = {s.name: s for s in status.services}
    for name in services:
        s = by_name.get(name)
        if s is None:
            return False, None
        if s.state in ("failed", "restarting"):
            return False, f"{name} {s.state}" + (f": {s.detail}" if s.detail else "")
        if s.state != "running" or (name in versions and s.package != versions[name]):
            return False, None
    return True, None
