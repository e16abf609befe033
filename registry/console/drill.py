"""``hapair drill PAIR --fault crash|freeze|service|partition|switchover``.

Runs one fault against a live pair and measures what a client of it sees: the outage
(time without a valid endpoint: the registry names none, or the one it names refuses
connections), the takeover time (fault to the first good answer from a newer epoch)
and, for a pair with a database, the acknowledged commits lost.

Where it runs: a crash, freeze, service kill or partition is inflicted on the active
node by the drill running *on that node* (it proves, from the node status's boot id
and PID, that the active's agent is local, and refuses otherwise); a switchover is a
request in etcd and works from anywhere. Freezes and partitions are always undone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from hapair.registry.console import drill_faults as faults
from hapair.registry.console.confirm import typed_name
from hapair.registry.console.drill_measure import Figures, Probe, Writer, figures
from hapair.shared import admin, keys
from hapair.shared.client.registries import parse_registries
from hapair.shared.client.resolver import Resolver
from hapair.shared.records import Leader, NodeStatus, RecordError, ServiceStatus, decode
from hapair.shared.store import Store, parse_endpoints
from hapair.shared.topology import Pair
from hapair.shared.waits import cancelled

FAULTS = ("crash", "freeze", "service", "partition", "switchover")
BASELINE_S = 10.0
# Commits before the fault, and after the recovery, so that the loss is measured across
# the takeover and not beside it.
WRITES_AROUND_S = 1.0
# With no failure seen this long after a service kill, it came back faster than a probe.
QUIET_S = 5.0


class DrillError(Exception):
    """The drill cannot run, or was stopped; the message says why. ``usage``: the
    command line was wrong."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class Plan:
    fault: str
    pair: Pair
    active: str
    epoch: int
    status: NodeStatus
    watch: str
    duration_s: float
    agent_pid: int | None = None
    victim: ServiceStatus | None = None
    cut: faults.Cut | None = None
    db_login: tuple[str, str, str] | None = None  # database, user, password
    notes: tuple[str, ...] = ()


@dataclass
class Result:
    plan: Plan
    t0: float = 0.0
    figures: Figures | None = None
    fault_note: str = ""
    new_leader: tuple[str, int] | None = None
    acked: int | None = None
    lost: list[int] = field(default_factory=list)
    after: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> bool:
        return self.figures is not None and self.figures.recovered is not None

    @property
    def takeover_s(self) -> float | None:
        fig = self.figures
        return None if fig is None or fig.takeover is None else fig.takeover.at - self.t0

    @property
    def ok(self) -> bool:
        return self.recovered and not self.lost


# ---- planning ------------------------------------------------------------------------


async def make_plan(
    store: Store,
    pair_name: str,
    fault: str,
    *,
    service: str | None = None,
    duration_s: float | None = None,
    etcd: str = "",
    registries: list[str] | None = None,
) -> Plan:
    if fault not in FAULTS:
        raise DrillError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
    _, site = await admin.read_topology(store)
    pair = site.pair(pair_name)
    if pair is None:
        raise DrillError(f"no pair {pair_name!r} in the applied topology")
    kv = await store.get(keys.leader(pair.name))
    if kv is None:
        raise DrillError(f"pair {pair.name} has no active node now: nothing to drill")
    try:
        active = decode(Leader, kv.value, kv.key).node
        st_kv = await store.get(keys.node_status(active))
        status = decode(NodeStatus, st_kv.value, st_kv.key) if st_kv else None
    except RecordError as err:
        raise DrillError(str(err)) from None
    if status is None or status.role != "active":
        raise DrillError(f"{active} holds pair {pair.name} but is not serving yet: try again")
    watch, victim = _targets(pair, status, service, fault)
    ttl = pair.failover.lease_ttl_s
    duration = duration_s if duration_s is not None else max(3 * ttl, 5.0)
    notes: list[str] = []
    plan = Plan(fault, pair, active, kv.create_revision, status, watch, duration, victim=victim)
    if fault != "switchover":
        try:
            agent = faults.local_agent(status)
        except faults.FaultError as err:
            raise DrillError(str(err)) from None
        plan = replace(plan, agent_pid=agent)
    if fault == "partition":
        plan = replace(plan, cut=_cut(pair, status, etcd, registries or []))
    login, why = _db_login(pair)
    if why:
        notes.append(why)
    return replace(plan, db_login=login, notes=tuple(notes))


def _targets(
    pair: Pair, status: NodeStatus, service: str | None, fault: str
) -> tuple[str, ServiceStatus | None]:
    """The endpoint the probe follows, and the service a ``service`` fault kills."""
    with_endpoint = [s.name for s in pair.services if s.endpoint is not None]
    if service is not None and service not in {s.name for s in pair.services}:
        raise DrillError(f"pair {pair.name} has no service {service!r}")
    if service is not None and service in with_endpoint:
        watch = service
    elif with_endpoint:
        watch = with_endpoint[0]
    elif pair.database is not None:
        watch = f"{pair.name}.db"
    else:
        raise DrillError(
            f"pair {pair.name} publishes no endpoint: a drill measures what a client sees"
        )
    if fault != "service":
        return watch, None
    name = service or next(
        (s.name for s in pair.services if s.placement == "active" and s.endpoint), None
    )
    name = name or next((s.name for s in pair.services if s.placement == "active"), None)
    victim = next((s for s in status.services if s.name == name), None)
    if victim is None or victim.pid is None or victim.state != "running":
        raise DrillError(f"no running service {name or '(none)'} on {status.node} to kill")
    return watch, victim


def _cut(pair: Pair, status: NodeStatus, etcd: str, registries: list[str]) -> faults.Cut:
    missing = faults.nft_missing()
    if missing:
        raise DrillError(missing)
    assert status.pid
    if not faults.same_netns(status.pid):
        raise DrillError("run the drill in the network namespace of the agent it partitions")
    peers = [n.address for n in pair.nodes if n.name != status.node]
    try:
        cut = faults.plan_cut(peers, parse_endpoints(etcd) if etcd else [])
    except (faults.FaultError, ValueError) as err:
        raise DrillError(str(err)) from None
    for url in registries:
        host = urlsplit(url).hostname or ""
        with contextlib.suppress(faults.FaultError):
            if set(faults.plan_cut([host], []).hosts) & set(cut.hosts):
                raise DrillError(
                    f"the registry {url} runs on a peer that the partition cuts off: "
                    "give one elsewhere with --registry"
                )
    return cut


def _db_login(pair: Pair) -> tuple[tuple[str, str, str] | None, str]:
    db = pair.database
    if db is None:
        return None, ""
    if not db.databases:
        return None, "data loss not measured: the pair's database lists no databases"
    spec = db.databases[0]
    try:
        password = Path(spec.password_file).read_text().strip()
    except OSError as err:
        return None, f"data loss not measured: cannot read {spec.password_file}: {err.strerror}"
    return (spec.name, spec.owner, password), ""


def describe(plan: Plan) -> list[str]:
    what = {
        "crash": f"kill the agent of {plan.active}, its watchdog and every process it started",
        "freeze": f"freeze the agent of {plan.active} (SIGSTOP) for {plan.duration_s:g} s",
        "service": f"kill service {plan.victim.name if plan.victim else '?'} on {plan.active}",
        "partition": f"cut {plan.active} off from etcd and its peers for {plan.duration_s:g} s",
        "switchover": f"request a switchover of pair {plan.pair.name} away from {plan.active}",
    }[plan.fault]
    lines = [
        f"drill {plan.fault} on pair {plan.pair.name}: active {plan.active} (epoch {plan.epoch})",
        f"  will {what}",
        f"  measuring through the registry: endpoint {plan.watch}",
    ]
    if plan.db_login is not None:
        lines.append(f"  and numbered commits through {plan.pair.name}.db (data loss)")
    lines += [f"  {n}" for n in plan.notes]
    return lines


# ---- running -------------------------------------------------------------------------


async def execute(
    plan: Plan,
    store: Store,
    registries: list[str],
    *,
    operator: str = "drill",
    timeout_s: float = 30.0,
    say: Callable[[str], None] = lambda _: None,
    registry_ca: str | None = None,
) -> Result:
    result = Result(plan)
    async with Resolver(parse_registries(registries), registry_ca=registry_ca) as resolver:
        probe = Probe(resolver, plan.watch)
        writer = _writer(plan, resolver)
        tasks = [asyncio.create_task(probe.run(), name="drill-probe")]
        try:
            if writer is not None:
                await writer.prepare()
                tasks.append(asyncio.create_task(writer.run(), name="drill-writer"))
            await _baseline(probe, writer)
            say(describe(plan)[1].replace("  will ", "now: ", 1))
            result.t0 = t0 = time.monotonic()
            result.fault_note = await _inflict(plan, store, probe, t0, timeout_s, operator)
            say(f"done: {result.fault_note}; waiting for the pair to be served again")
            await _until_done(plan, probe, t0, timeout_s)
            result.figures = figures(probe.samples, t0, plan.epoch)
            if writer is not None and result.figures.recovered is not None:
                await _writes_after(writer, result.figures.recovered.at, t0 + timeout_s)
        finally:
            await cancelled(*tasks)
        if writer is not None:
            result.acked = len(writer.acked)
            result.lost = await writer.lost()
    result.new_leader = await _leader(store, plan.pair.name)
    result.after = await _after(plan, store)
    return result


def _writer(plan: Plan, resolver: Resolver) -> Writer | None:
    if plan.db_login is None:
        return None
    dbname, user, password = plan.db_login
    return Writer(resolver, f"{plan.pair.name}.db", dbname, user, password)


async def _baseline(probe: Probe, writer: Writer | None) -> None:
    deadline = time.monotonic() + BASELINE_S
    while probe.good_since(0.0) is None or (writer is not None and not writer.acked):
        if time.monotonic() > deadline:
            what = "its endpoint" if probe.good_since(0.0) is None else "its database"
            raise DrillError(f"the pair does not serve before the fault ({what}): nothing to drill")
        await asyncio.sleep(0.05)
    if writer is not None:
        await asyncio.sleep(WRITES_AROUND_S)


async def _writes_after(writer: Writer, since: float, deadline: float) -> None:
    """Until the writer has had commits acknowledged for a while after ``since``."""
    while time.monotonic() < deadline:
        if writer.last_ack >= since + WRITES_AROUND_S:
            return
        await asyncio.sleep(0.05)


async def _inflict(
    plan: Plan, store: Store, probe: Probe, t0: float, timeout_s: float, operator: str
) -> str:
    agent = plan.agent_pid
    try:
        match plan.fault:
            case "crash":
                assert agent is not None
                db = plan.status.database or {}
                extra = [db["pid"]] if isinstance(db.get("pid"), int) else []
                n = faults.crash(agent, extra)
                return f"killed {n} processes (agent {agent} and all it started) at once"
            case "service":
                assert agent is not None and plan.victim is not None and plan.victim.pid
                faults.kill_service(agent, plan.victim.pid)
                return f"killed service {plan.victim.name} (pid {plan.victim.pid}) with SIGKILL"
            case "freeze":
                assert agent is not None
                with faults.frozen(agent, plan.duration_s):
                    await _until_done(plan, probe, t0, plan.duration_s, until_end=True)
                return f"froze the agent (pid {agent}) for {time.monotonic() - t0:.1f} s"
            case "partition":
                assert plan.cut is not None
                with faults.partitioned(plan.cut, plan.duration_s):
                    await _until_done(plan, probe, t0, plan.duration_s, until_end=True)
                cut = ", ".join([*plan.cut.hosts, *(f"{h}:{p}" for h, p in plan.cut.services)])
                return f"cut off from {cut} for {time.monotonic() - t0:.1f} s, then healed"
            case _:
                request = await admin.request_switchover(
                    store, plan.pair.name, None, operator, "hapair drill"
                )
                return f"switchover requested (request {request.id})"
    except faults.FaultError as err:
        raise DrillError(str(err)) from None


def _done(plan: Plan, probe: Probe, t0: float) -> bool:
    fig = figures(probe.samples, t0, plan.epoch)
    if fig.takeover is not None:
        return True
    if plan.fault == "service":
        bad = any(not s.ok for s in probe.samples if s.at >= t0)
        return (bad and fig.recovered is not None) or (not bad and time.monotonic() > t0 + QUIET_S)
    return False


async def _until_done(
    plan: Plan, probe: Probe, t0: float, limit_s: float, until_end: bool = False
) -> None:
    """Until the pair is served again (``until_end``: until ``limit_s`` is over anyway)."""
    while time.monotonic() < t0 + limit_s:
        if not until_end and _done(plan, probe, t0):
            return
        await asyncio.sleep(0.05)


async def _leader(store: Store, pair: str) -> tuple[str, int] | None:
    for _ in range(50):  # etcd may still be electing
        kv = await store.get(keys.leader(pair))
        if kv is not None:
            with contextlib.suppress(RecordError):
                return decode(Leader, kv.value, kv.key).node, kv.create_revision
        await asyncio.sleep(0.1)
    return None


async def _after(plan: Plan, store: Store) -> list[str]:
    node = plan.active
    if plan.fault == "crash":
        return [
            f"{node}: its agent was killed; it rejoins as standby when its service manager "
            "restarts it (systemd Restart=always)"
        ]
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        kv = await store.get(keys.node_status(node))
        with contextlib.suppress(RecordError):
            st = decode(NodeStatus, kv.value, kv.key) if kv else None
            if st is not None and st.role in ("standby", "active"):
                return [f"{node}: back as {st.role}"]
        await asyncio.sleep(0.1)
    return [f"{node}: not back as standby within 15 s (see its log)"]


def report(result: Result) -> list[str]:
    plan, fig = result.plan, result.figures
    lines = [f"fault: {result.fault_note}"]
    if fig is None or fig.recovered is None:
        lines.append(f"NOT RECOVERED: no good answer from {plan.watch} within the timeout")
    else:
        lines.append(
            f"outage: {fig.outage_s:.3f} s without a valid endpoint for {plan.watch} "
            "(as a client sees it through the registry)"
        )
    if fig is not None and fig.takeover is not None:
        lines.append(
            f"takeover: {fig.takeover.node} serving at epoch {fig.takeover.epoch}, "
            f"{result.takeover_s:.3f} s after the fault"
        )
    elif fig is not None and fig.recovered is not None:
        lines.append(f"takeover: none: {plan.watch} recovered in place on {plan.active}")
    if result.acked is not None:
        lines.append(
            f"data loss: {len(result.lost)} of {result.acked} acknowledged commits lost "
            f"through {plan.pair.name}.db"
            + (f" (first missing: {result.lost[:5]})" if result.lost else "")
        )
    else:
        lines.append("data loss: not measured (no database, or no login for it)")
    if result.new_leader is not None:
        node, epoch = result.new_leader
        lines.append(f"leader now: {node} (epoch {epoch})")
    return lines + result.after


# ---- the command ---------------------------------------------------------------------


async def command(
    args: argparse.Namespace, store: Store, say: Callable[[str], None], operator: str
) -> bool:
    """``hapair drill``: plan, confirm, run, report. True when the pair recovered with no
    acknowledged commit lost."""
    try:
        registries = parse_registries(args.registry or "")
    except ValueError:
        raise DrillError(
            "no registry given: use --registry URL or set HAPAIR_REGISTRY (the drill "
            "measures what a client sees through it)",
            usage=True,
        ) from None
    plan = await make_plan(
        store,
        args.pair,
        args.fault,
        service=args.service,
        duration_s=args.duration,
        etcd=args.etcd or "",
        registries=registries,
    )
    for line in describe(plan):
        say(line)
    if not args.yes:
        confirmed = await typed_name(plan.pair.name, f"this disturbs pair {plan.pair.name}")
        if confirmed is None:
            raise DrillError("no terminal to confirm on: add --yes to run the drill", usage=True)
        if not confirmed:
            raise DrillError("drill cancelled: nothing was done")
    result = await execute(
        plan,
        store,
        registries,
        operator=operator,
        timeout_s=args.timeout,
        say=say,
        registry_ca=args.registry_ca,
    )
    for line in report(result):
        say(line)
    return result.ok
