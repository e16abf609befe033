"""One immutable snapshot of the whole site, parsed from the keys under ``/hapair/v1``.

:meth:`SiteView.from_kvs` is a pure function of the key-values, so the registry (from
its watched mirror) and the CLI (from one read) see the same site the same way. A value
someone else wrote is never trusted: garbage is collected into ``problems`` (key and
field) and the key is treated as absent.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from hapair.shared import drift, keys, records
from hapair.shared.plcs import PlcReports
from hapair.shared.report import (
    DatabaseReport,
    EndpointReport,
    EventReport,
    NodeReport,
    Note,
    PackageReport,
    PairReport,
    PendingSwitchover,
    PlcReport,
    ProblemReport,
    RecoveryReport,
    ServiceReport,
    SiteReport,
    TopologyInfo,
    WorkshopReport,
)
from hapair.shared.store import Kv
from hapair.shared.topology import Node, Pair, Site, TopologyError, format_errors, parse_site

RECENT_EVENTS = 50


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    problem: str


@dataclass(frozen=True, slots=True)
class ActiveTerm:
    """The active node of a pair and its term, from the leader key: ``epoch`` is the
    key's create_revision, ``lease`` the lease it is bound to."""

    node: str
    epoch: int
    since: float
    lease: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to an endpoint lookup: HTTP status and JSON body."""

    status: int
    body: Mapping[str, Any]

    @property
    def epoch(self) -> int | None:
        epoch = self.body.get("epoch") if self.status == 200 else None
        return epoch if isinstance(epoch, int) else None


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A decoded value, kept with the revision it was decoded at so that a rebuild
    after one change re-parses only that key."""

    mod_revision: int
    value: object
    problems: tuple[Problem, ...] = ()


def _classify(parts: list[str]) -> tuple[str, str] | None:
    match parts:
        case ["topology", "site"]:
            return "topology", ""
        case ["pairs", pair, "leader"]:
            return "leader", pair
        case ["pairs", pair, "paused"]:
            return "paused", pair
        case ["pairs", pair, "commands", "switchover"]:
            return "switchover", pair
        case ["pairs", pair, "recovery"]:
            return "recovery", pair
        case ["nodes", node, "status"]:
            return "status", node
        case ["nodes", node, "drained"]:
            return "drained", node
        case ["nodes", node, "reports", service]:
            return "plcs", f"{node}/{service}"
        case ["endpoints", service]:
            return "endpoint", service
    return None


_MODELS: dict[str, type[records.Record]] = {
    "leader": records.Leader,
    "paused": records.Paused,
    "switchover": records.Switchover,
    "recovery": records.Recovery,
    "status": records.NodeStatus,
    "drained": records.Drained,
    "endpoint": records.EndpointRecord,
    "event": records.Event,
}


def _parse(kind: str, name: str, kv: Kv) -> _Parsed:
    try:
        if kind == "plcs":
            return _Parsed(kv.mod_revision, _plc_reports(kv))
        if kind == "topology":
            doc = records.decode(records.TopologyDoc, kv.value, kv.key)
            return _Parsed(kv.mod_revision, (doc, parse_site(doc.site, kv.key)))
        record = records.decode(_MODELS[kind], kv.value, kv.key)
    except records.RecordError as err:
        return _Parsed(kv.mod_revision, None, tuple(Problem(kv.key, p) for p in err.problems))
    except TopologyError as err:
        problems = (Problem(kv.key, "site." + p.removeprefix("(top level)")) for p in err.problems)
        return _Parsed(kv.mod_revision, None, tuple(problems))
    # A record filed under another name's key would be served for the wrong thing.
    owner = {"status": "node", "endpoint": "service"}.get(kind)
    if owner is not None and getattr(record, owner) != name:
        problem = f"{owner}: {getattr(record, owner)!r} does not match the key"
        return _Parsed(kv.mod_revision, None, (Problem(kv.key, problem),))
    if isinstance(record, records.Leader):
        leader = ActiveTerm(record.node, kv.create_revision, record.since, kv.lease)
        return _Parsed(kv.mod_revision, leader)
    return _Parsed(kv.mod_revision, record)


def _note(flag: records.Paused | records.Drained | None) -> Note | None:
    return None if flag is None else Note(by=flag.by, at=flag.at, reason=flag.reason)


@dataclass(frozen=True)
class SiteView:
    """Everything under ``/hapair/v1`` at one revision. Maps are keyed by pair (leaders,
    paused, switchovers), node (statuses, drained), service (endpoints) or key (events);
    ``memo`` keeps each decoded key with its mod_revision for the next rebuild."""

    site: Site | None = None
    topology: records.TopologyDoc | None = None
    leaders: Mapping[str, ActiveTerm] = field(default_factory=dict)
    endpoints: Mapping[str, records.EndpointRecord] = field(default_factory=dict)
    statuses: Mapping[str, records.NodeStatus] = field(default_factory=dict)
    paused: Mapping[str, records.Paused] = field(default_factory=dict)
    drained: Mapping[str, records.Drained] = field(default_factory=dict)
    switchovers: Mapping[str, records.Switchover] = field(default_factory=dict)
    recoveries: Mapping[str, records.Recovery] = field(default_factory=dict)
    plcs: Mapping[str, PlcReports] = field(default_factory=dict)
    """What services report of PLCs, by ``{node}/{service}``."""
    events: Mapping[str, records.Event] = field(default_factory=dict)
    """The most recent events by key, oldest first."""
    problems: tuple[Problem, ...] = ()
    revision: int = 0
    memo: Mapping[str, _Parsed] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_kvs(
        cls,
        kvs: Iterable[Kv],
        revision: int = 0,
        previous: SiteView | None = None,
        recent_events: int = RECENT_EVENTS,
    ) -> SiteView:
        """Parse every key under the prefix; ``previous`` lends its decoded values for
        keys that have not changed since."""
        old = previous.memo if previous is not None else {}
        memo: dict[str, _Parsed] = {}
        found: dict[str, dict[str, object]] = {k: {} for k in (*_MODELS, "topology", "plcs")}
        event_kvs: list[Kv] = []
        for kv in kvs:
            if kv.key.startswith(keys.EVENTS_PREFIX):
                event_kvs.append(kv)  # the bulk of the keys: only the newest are decoded
                continue
            kind_name = _classify(keys.split(kv.key))
            if kind_name is None:
                continue  # keys of later versions or other tools are none of our business
            kind, name = kind_name
            parsed = old.get(kv.key)
            if parsed is None or parsed.mod_revision != kv.mod_revision:
                parsed = _parse(kind, name, kv)
            memo[kv.key] = parsed
            if parsed.value is not None:
                found[kind][name or kv.key] = parsed.value
        # Oldest first, as they happened.
        newest = heapq.nlargest(recent_events, event_kvs, key=lambda kv: keys.event_order(kv.key))
        for kv in reversed(newest):
            parsed = old.get(kv.key)
            if parsed is None or parsed.mod_revision != kv.mod_revision:
                parsed = _parse("event", "", kv)
            memo[kv.key] = parsed
            if parsed.value is not None:
                found["event"][kv.key] = parsed.value
        topology = next(iter(found["topology"].values()), None)
        doc, site = topology if isinstance(topology, tuple) else (None, None)
        return cls(
            site=site,
            topology=doc,
            leaders=_frozen(found["leader"]),
            endpoints=_frozen(found["endpoint"]),
            statuses=_frozen(found["status"]),
            paused=_frozen(found["paused"]),
            drained=_frozen(found["drained"]),
            switchovers=_frozen(found["switchover"]),
            recoveries=_frozen(found["recovery"]),
            plcs=_frozen(found["plcs"]),
            events=_frozen(found["event"]),
            problems=tuple(p for parsed in memo.values() for p in parsed.problems),
            revision=revision,
            memo=MappingProxyType(memo),
        )

    # ---- questions about the site -------------------------------------------------

    def pair(self, name: str) -> Pair | None:
        return self.site.pair(name) if self.site is not None else None

    def node_up(self, node: str) -> bool:
        """An agent is up while its lease-bound status key exists."""
        return node in self.statuses

    def cannot_take_over(self, pair: Pair, node: str) -> str | None:
        """Why ``node`` could not become active in ``pair`` now, or None if it could."""
        if pair.node(node) is None:
            return f"{node} is not a node of pair {pair.name}"
        leader = self.leaders.get(pair.name)
        if leader is not None and leader.node == node:
            return f"{node} is already active"
        if node in self.drained:
            return f"{node} is drained"
        status = self.statuses.get(node)
        if status is None:
            return f"{node} is down (no agent status)"
        if not status.healthy:
            problems = "; ".join(status.problems)
            return f"{node} is not healthy" + (f" ({problems})" if problems else "")
        return None

    def eligible_standbys(self, pair: Pair) -> list[Node]:
        """Standbys in priority order that an untargeted switchover could pick."""
        return [
            n
            for n in pair.nodes
            if not n.no_failover and self.cannot_take_over(pair, n.name) is None
        ]

    def services(self) -> set[str]:
        """Every service a client may look up: declared with an endpoint, or published."""
        declared = (
            {s.name for p in self.site.pairs() for s in p.services if s.endpoint is not None}
            | {f"{p.name}.db" for p in self.site.pairs() if p.database is not None}
            if self.site is not None
            else set()
        )
        return declared | set(self.endpoints)

    def lookup(self, service: str) -> Lookup:
        found = self.site.pair_of_service(service) if self.site is not None else None
        record = self.endpoints.get(service)
        if found is not None:
            pair, declared = found
            if declared.endpoint is None and record is None:
                return Lookup(404, {"error": f"service {service!r} declares no endpoint"})
            pair_name = pair.name
        elif self.site is not None and (db_pair := self.site.pair_of_database(service)):
            pair_name = db_pair.name
        elif record is not None:
            # Without a usable topology the agents' own records still answer clients.
            pair_name = record.pair
        else:
            return Lookup(404, {"error": f"unknown service {service!r}"})
        leader = self.leaders.get(pair_name)
        if leader is None:
            return Lookup(503, {"error": self._no_active(pair_name)})
        if record is None or (record.pair, record.node, record.epoch) != (
            pair_name,
            leader.node,
            leader.epoch,
        ):
            return Lookup(
                503,
                {
                    "error": f"endpoint not yet published: {leader.node} is active "
                    f"in pair {pair_name} at epoch {leader.epoch}"
                },
            )
        published = self.memo.get(keys.endpoint(service))
        return Lookup(
            200,
            {
                "service": service,
                "pair": pair_name,
                "node": record.node,
                "host": record.host,
                "port": record.port,
                "protocol": record.protocol,
                "epoch": record.epoch,
                # Orders endpoints of one epoch (republished at another address), the
                # same on every registry: the endpoint key's mod revision.
                "revision": published.mod_revision if published is not None else 0,
            },
        )

    def _no_active(self, pair_name: str) -> str:
        reason = f"pair {pair_name} has no active node"
        if pair_name in self.paused:
            return reason + " and is paused: automatic failover is off until it is resumed"
        pair = self.pair(pair_name)
        if pair is not None and not any(self.node_up(n.name) for n in pair.nodes):
            reason += f" (no agent is up on {', '.join(n.name for n in pair.nodes)})"
        return reason

    # ---- the operator's report ----------------------------------------------------

    def report(self) -> SiteReport:
        workshops = (
            []
            if self.site is None
            else [
                WorkshopReport(name=w.name, pairs=[self._pair_report(p) for p in w.pairs])
                for w in self.site.workshops
            ]
        )
        info = None
        if self.topology is not None and self.site is not None:
            info = TopologyInfo(
                site=self.site.site,
                applied_by=self.topology.applied_by,
                applied_at=self.topology.applied_at,
            )
        return SiteReport(
            site=self.site.site if self.site is not None else None,
            revision=self.revision,
            topology=info,
            workshops=workshops,
            events=[EventReport.model_validate(e.model_dump()) for e in self.events.values()],
            problems=[ProblemReport(key=p.key, problem=p.problem) for p in self.problems],
        )

    def to_json(self) -> dict[str, Any]:
        return self.report().model_dump(mode="json")

    def node_report(self, node: Node, pair: Pair | None = None) -> NodeReport:
        status = self.statuses.get(node.name)
        drained = _note(self.drained.get(node.name))
        if status is None:
            return NodeReport(
                name=node.name, address=node.address, up=False, role="down", drained=drained
            )
        services = [
            ServiceReport(
                name=s.name,
                state=s.state,
                restarts=s.restarts,
                placement=s.placement,
                detail=s.detail,
            )
            for s in status.services
        ]
        return NodeReport(
            name=node.name,
            address=node.address,
            up=True,
            role=status.role,
            healthy=status.healthy,
            problems=list(status.problems),
            services=services,
            drained=drained,
            epoch=status.epoch,
            updated=status.updated,
            database=_database_report(status.database),
            packages=_package_reports(pair, status) if pair is not None else [],
            drift=list(drift.lacking(pair, drift.held(status.packages))) if pair else [],
        )

    def lacks(self, pair: Pair, node: str) -> tuple[str, ...]:
        """The services of ``pair`` whose declared package version ``node`` does not hold,
        by its status (none: it holds none)."""
        status = self.statuses.get(node)
        return drift.lacking(pair, drift.held(status.packages if status is not None else []))

    def endpoint_report(self, service: str) -> EndpointReport:
        answer = self.lookup(service)
        return EndpointReport.model_validate(
            {**answer.body, "service": service, "status": answer.status}
        )

    def _pair_report(self, pair: Pair) -> PairReport:
        leader = self.leaders.get(pair.name)
        request = self.switchovers.get(pair.name)
        pending = (
            None
            if request is None
            else PendingSwitchover(
                id=request.id, to=request.to, by=request.by, at=request.at, reason=request.reason
            )
        )
        endpoints = [self.endpoint_report(s.name) for s in pair.services if s.endpoint is not None]
        if pair.database is not None:
            endpoints.append(self.endpoint_report(f"{pair.name}.db"))
        return PairReport(
            name=pair.name,
            active=leader.node if leader else None,
            epoch=leader.epoch if leader else None,
            since=leader.since if leader else None,
            paused=_note(self.paused.get(pair.name)),
            switchover=pending,
            recovery=(
                None
                if (rec := self.recoveries.get(pair.name)) is None
                else RecoveryReport.model_validate(rec.model_dump())
            ),
            nodes=[self.node_report(n, pair) for n in pair.nodes],
            endpoints=endpoints,
            plcs=self.plc_reports(pair),
        )

    def plc_reports(self, pair: Pair) -> list[PlcReport]:
        """Every PLC of ``pair`` as each node's comm server reports it, PLC by PLC in
        the order first reported, nodes in the pair's order; a PLC of the topology
        that no node reports is listed without a node."""
        found: dict[str, list[PlcReport]] = {}
        for node in pair.nodes:
            prefix = f"{node.name}/"
            for key in sorted(k for k in self.plcs if k.startswith(prefix)):
                report = self.plcs[key]
                for name, health in report.plcs.items():
                    found.setdefault(name, []).append(
                        PlcReport(name=name, node=node.name, service=report.service, **dict(health))
                    )
        for plc in pair.plcs:
            if plc.name not in found:
                found[plc.name] = [
                    PlcReport(name=plc.name, state="unreported", critical=plc.critical)
                ]
        return [r for reports in found.values() for r in reports]


def _package_reports(pair: Pair, status: records.NodeStatus) -> list[PackageReport]:
    """Each declared package of ``pair`` on the node ``status`` describes."""
    held = drift.held(status.packages)
    runs = {s.name: s.package for s in status.services}
    out = []
    for name, package in sorted(drift.declared(pair).items()):
        reported = next((p for p in status.packages if p.service == name), None)
        state, detail = "not reported", None
        if package.dir_name in held.get(name, ()):
            state = "installed"
        elif reported is not None and reported.version == package.version:
            state, detail = reported.state, reported.detail
        elif reported is not None:
            state = "installing"  # the node has not taken up this site file yet
        out.append(
            PackageReport(
                service=name,
                declared=package.version,
                state=state,
                detail=detail,
                held=list(reported.installed) if reported is not None else [],
                running=runs.get(name),
            )
        )
    return out


def _database_report(db: Mapping[str, Any] | None) -> DatabaseReport | None:
    """The part of a node's database status an operator reads; garbage shows nothing."""
    if not db:
        return None
    replicas = db.get("replicas") or []
    sync = [
        str(r.get("name"))
        for r in replicas
        if isinstance(r, Mapping) and r.get("sync_state") in ("sync", "quorum")
    ]
    try:
        return DatabaseReport(
            role=str(db.get("role", "unknown")),
            timeline=db.get("timeline"),
            lag_bytes=db.get("lag_bytes"),
            lag_s=db.get("lag_s"),
            streaming=bool(db.get("streaming")),
            synchronous=sync,
        )
    except ValueError:
        return None


def _plc_reports(kv: Kv) -> PlcReports:
    """The ``plcs`` part of a service's report (none for other services' reports)."""
    try:
        return PlcReports.model_validate_json(kv.value)
    except ValidationError as err:
        raise records.RecordError(kv.key, format_errors(err)) from None


def _frozen(items: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(items)
