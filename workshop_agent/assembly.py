"""The parts of a node's run in its pair, built once its pair is known.

Each part is told what it needs as callbacks, never handed the agent: ``Core`` names
everything the parts ask of the agent's loop (``agent.py``), so this is the one place
where the seams between them can be read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hapair.shared import etcd_tls
from hapair.shared.clock import Clock
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.store import Store
from hapair.shared.topology import Failover, Node, Pair
from hapair.workshop_agent import priority
from hapair.workshop_agent.beating import Beating, timing_of
from hapair.workshop_agent.claim import NodeClaim
from hapair.workshop_agent.database import Database
from hapair.workshop_agent.database_care import DatabaseCare
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.fence_loop import FenceLoop, Figures, Lateness
from hapair.workshop_agent.fencing import Fencing
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.holding import Holding
from hapair.workshop_agent.members import MemberSets
from hapair.workshop_agent.netwatch import NetWatch
from hapair.workshop_agent.observe import PairState
from hapair.workshop_agent.package_peers import PeerPackages
from hapair.workshop_agent.packages import Packages
from hapair.workshop_agent.publisher import Publisher
from hapair.workshop_agent.recovery_steps import RecoverySteps
from hapair.workshop_agent.rollout import RestartRequests
from hapair.workshop_agent.run_as import ServiceUsers
from hapair.workshop_agent.settings import AgentSettings
from hapair.workshop_agent.step_down import StepDowns
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.take_over import TakeOvers
from hapair.workshop_agent.tasks import Tasks
from hapair.workshop_agent.vip import VipKeeper
from hapair.workshop_agent.watchdog import WatchdogLink


class Core(Protocol):
    """What the parts ask of the agent's loop."""

    settings: AgentSettings
    me: str
    store: Store
    clock: Clock
    log: EventLog
    tasks: Tasks
    pairs: Mirror
    nodes: Mirror
    netwatch: NetWatch
    members: MemberSets
    claim: NodeClaim
    wake: asyncio.Event
    dirty: asyncio.Event
    pair: Pair | None
    node: Node | None
    in_topology: bool
    term: int | None
    state: PairState | None
    last_leader: str | None
    newest_epoch: int | None
    held_pending: frozenset[str]

    def changed(self, _: object = None) -> None: ...
    def event(self, kind: str, reason: str = "", **details: object) -> None: ...
    def end_term(self) -> int | None: ...
    def begin_term(self, epoch: int, held: frozenset[str]) -> None: ...
    def lease_changed(self) -> None: ...
    def hold_peers(self) -> frozenset[str]: ...
    def beat_peers(self) -> frozenset[str]: ...
    def stop_active(self) -> None: ...
    def acts_as_active(self) -> bool: ...
    def stopped(self) -> bool: ...
    def paused(self) -> bool: ...
    def db_ready(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Parts:
    session: Session
    election: Election
    beating: Beating
    fencing: Fencing
    fence_loop: FenceLoop
    holding: Holding
    supervisor: Supervisor
    vip: VipKeeper
    database: Database | None
    db_care: DatabaseCare | None
    recovery: RecoverySteps
    publisher: Publisher
    steps: StepDowns
    take_overs: TakeOvers
    packages: Packages
    peer_packages: PeerPackages | None
    restarts: RestartRequests


def _placed(core: Core) -> tuple[Pair | None, Node | None]:
    """This node's pair and node while the topology names it; nothing once it is out
    (its packages are then not the pair's business)."""
    return (core.pair, core.node) if core.in_topology else (None, None)


def _failover(core: Core) -> Failover:
    assert core.pair is not None
    return core.pair.failover


def assemble(core: Core, pair: Pair, node: Node, watchdog: WatchdogLink) -> Parts:
    """Build the parts for ``pair``; the caller starts their tasks (:func:`start`)."""
    f = pair.failover
    session = Session(
        core.store, f.lease_ttl_s, f.fence_after_s, core.log, core.clock, core.lease_changed
    )
    session.may_regrant = lambda: core.term is None
    election = Election(core.store, pair.name, core.me)
    ledger = Ledger()  # as the active: the peers' promises during an etcd loss
    supervisor: Supervisor | None = None

    def figures(kind: Lateness) -> Figures:
        now = core.clock()
        timing = beating.heartbeat.timing if beating.heartbeat else beating.pair_timing()
        source: Session | Beating = session
        fence, interval = session.fence_after, session.interval
        if kind == "term beat" and timing is not None:
            source, fence, interval = beating, timing.fence_after, timing.interval
        return Figures(kind, fence, interval, source.slowest.worst(now), source.lag.worst(now))

    fence_loop = FenceLoop(
        core.clock,
        core.log,
        figures=figures,
        settings=lambda: (_failover(core), core.pair is not None and core.pair.network is not None),
        realtime=priority.realtime,
        event=core.event,
        dirty=core.dirty.set,
    )
    fencing = Fencing(
        session,
        ledger,
        core.clock,
        core.log,
        term=lambda: core.term,
        end_term=core.end_term,
        hold_peers=core.hold_peers,
        fence_margin=lambda: _failover(core).fence_margin_s,
        watchdog_deadline=watchdog.deadline,
        watchdog_lease=watchdog.lease,
        active_up=lambda: supervisor is not None and supervisor.active_up(),
        stop_active=core.stop_active,
        event=core.event,
        changed=core.changed,
        late=fence_loop.late,
    )
    beating = Beating(
        core.store,
        pair.name,
        core.me,
        session,
        core.clock,
        core.log,
        timing=lambda: timing_of(_failover(core).term_beat),
        term=lambda: core.term,
        epoch=lambda: core.newest_epoch,
        moved=lambda: beat_acked(),
        refused=fencing.due,
        wake=core.wake.set,
        late=lambda: holding.beat_late(),
        peers=core.beat_peers,
        asked=core.hold_peers,
        ask=lambda epoch, ttl: core.netwatch.send_hold(epoch, ttl, beat=True),
        asking=lambda: holding.asking,
    )
    fencing.beat = beating
    holding = Holding(
        session,
        ledger,
        fencing,
        core.netwatch,
        core.clock,
        core.log,
        term=lambda: core.term,
        active=core.acts_as_active,
        stopped=core.stopped,
        newest_epoch=lambda: core.newest_epoch,
        seen_revision=lambda: core.pairs.revision,
        lease_ttl=lambda: _failover(core).lease_ttl_s,
        wake=core.wake.set,
        dirty=core.dirty.set,
        beat_late_at=beating.hold_instant,
        beat_reply=beating.promise,
        released=beating.released,
    )

    def beat_acked() -> None:
        fencing.moved()
        holding.confirmed()

    core.netwatch.on_hold = holding.on_hold
    core.netwatch.on_hold_reply = holding.on_hold_reply
    core.netwatch.on_release = holding.on_release
    env = {
        "HAPAIR_NODE": core.me,
        "HAPAIR_PAIR": pair.name,
        "HAPAIR_ETCD": core.settings.etcd,
        **etcd_tls.service_env(core.settings.etcd_tls),
    }
    settings = core.settings
    users = ServiceUsers(
        settings.service_user, settings.service_group, settings.allow_root_services
    )
    # The pair's peers see this agent by the certificate it shows etcd.
    peer_packages = PeerPackages.create(
        core.log,
        settings.etcd_tls,
        place=lambda: _placed(core),
        nodes=core.nodes,
    )
    packages = Packages(
        settings.state_dir,
        users,
        core.log,
        place=lambda: _placed(core),
        event=core.event,
        changed=core.changed,
        in_use=lambda: supervisor.statuses() if supervisor is not None else (),
        ssl=settings.package_ssl,
        peers=peer_packages,
    )
    supervisor = Supervisor(
        pair,
        node,
        core.log,
        watchdog,
        fencing.may_run,
        core.paused,
        core.changed,
        settings.state_dir,
        env,
        core.clock,
        fencing.run_until,
        users=users,
        event=core.event,
        package_dir=packages.ready_dir,
        installed_dir=packages.installed_dir,
    )
    vip = VipKeeper(core.log, watchdog)
    database: Database | None = None
    db_care: DatabaseCare | None = None
    if pair.database is not None:
        database = Database(pair.database, pair, node, election, core.log, core.changed)
        db_care = DatabaseCare(
            database,
            supervisor,
            watchdog,
            core.log,
            core.me,
            pair=lambda: core.pair,
            term=lambda: core.term,
            state=lambda: core.state,
            may_run=fencing.may_run,
            held=lambda: core.held_pending,
            changed=core.changed,
            dirty=core.dirty.set,
            spawn=core.tasks.spawn,
        )
    recovery = RecoverySteps(
        core.store,
        election,
        core.pairs,
        supervisor,
        database,
        core.clock,
        core.log,
        pair=lambda: core.pair,
        term=lambda: core.term,
        event=core.event,
        spawn=core.tasks.spawn,
    )
    steps: StepDowns | None = None
    publisher = Publisher(
        core.store,
        election,
        session,
        supervisor,
        core.netwatch,
        database,
        core.clock,
        core.log,
        core.me,
        core.dirty,
        place=lambda: (core.pair, core.node),
        in_topology=lambda: core.in_topology,
        term=lambda: core.term,
        holdoff_until=lambda: steps.holdoff_until if steps is not None else 0.0,
        lost=lambda: core.state.lost if core.state is not None else (),
        held_by=lambda: holding.promised_to,
        packages=packages.statuses,
        fence_loop=fence_loop.problem,
    )
    steps = StepDowns(
        core.store,
        election,
        core.pairs,
        supervisor,
        vip,
        database,
        db_care,
        publisher,
        core.clock,
        core.log,
        pair=lambda: core.pair,
        term=lambda: core.term,
        end_term=core.end_term,
        state=lambda: core.state,
        event=core.event,
        changed=core.changed,
    )
    take_overs = TakeOvers(
        session,
        election,
        core.pairs,
        holding,
        recovery,
        supervisor,
        db_care,
        core.members,
        beating,
        core.clock,
        core.log,
        core.me,
        pair=lambda: core.pair,
        state=lambda: core.state,
        last_leader=lambda: core.last_leader,
        begin_term=core.begin_term,
        db_ready=core.db_ready,
        event=core.event,
        changed=core.changed,
        lacks=lambda: packages.lacking(core.pair) if core.pair is not None else (),
    )
    restarts = RestartRequests(
        core.me,
        core.pairs,
        supervisor,
        core.log,
        pair=lambda: core.pair,
        term=lambda: core.term,
        event=core.event,
        spawn=core.tasks.spawn,
    )
    return Parts(
        session,
        election,
        beating,
        fencing,
        fence_loop,
        holding,
        supervisor,
        vip,
        database,
        db_care,
        recovery,
        publisher,
        steps,
        take_overs,
        packages,
        peer_packages,
        restarts,
    )


def start(
    parts: Parts, spawn: Callable[..., object], pair: Pair, node: Node, netwatch: NetWatch
) -> None:
    """Start what runs on its own: the shared services, the database's care, the lease
    session, the hold protocol, the network probes, the publisher and the packages, which
    every node installs in the background (and serves its peers, when its pair says so)."""
    parts.supervisor.start_shared()
    if parts.db_care is not None:
        parts.db_care.start()
    spawn(parts.session.run(), "session")
    spawn(parts.holding.run(), "hold")
    spawn(parts.beating.run(), "beat")
    parts.beating.watch(spawn, pair)
    spawn(netwatch.update(pair, node), "network-probes")
    spawn(parts.publisher.run(), "publisher")
    spawn(parts.packages.run(), "packages")
    if parts.peer_packages is not None:
        spawn(parts.peer_packages.run(), "packages-to-peers")
