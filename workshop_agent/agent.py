"""The agent's loop: observe, decide, act; plus the fence timer that never waits.

Everything that can stall (etcd calls, stopping services) happens here, outside the
pure decision. The fence timer and the watchdog do not depend on this loop making
progress: they stop the services at the fence point whatever the loop is doing.

The parts it wires together, each told what it needs (callbacks, not this class):
``fencing.py`` (the fence point and timer), ``holding.py`` (riding out an etcd loss on
the peers' promises), ``members.py`` (the pair's member sets), ``database_care.py`` (the
database's loop and guard), ``recovery_steps.py`` (assisted recovery), ``step_down.py``
(resigning and handing over), ``publisher.py`` (the node's records in etcd),
``claim.py`` (one run per node), ``topology_view.py`` and ``tasks.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from hapair.shared import etcd_tls, keys
from hapair.shared.clock import boottime
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import Event
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Failover, Node, Pair
from hapair.shared.waits import wait_event
from hapair.workshop_agent import database_care
from hapair.workshop_agent import decide as d
from hapair.workshop_agent.candidates import hold_peers
from hapair.workshop_agent.claim import AgentError, NodeClaim, lock_state_dir
from hapair.workshop_agent.database import Database
from hapair.workshop_agent.database_care import DatabaseCare
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.fencing import Fencing
from hapair.workshop_agent.hold import Ledger
from hapair.workshop_agent.holding import Holding
from hapair.workshop_agent.members import MemberSets
from hapair.workshop_agent.netwatch import NetWatch
from hapair.workshop_agent.node_lock import unlock
from hapair.workshop_agent.observation import Observation
from hapair.workshop_agent.observe import PairObserver, PairState
from hapair.workshop_agent.publisher import Publisher
from hapair.workshop_agent.recovery_steps import RecoverySteps
from hapair.workshop_agent.run_as import ServiceUsers
from hapair.workshop_agent.settings import AgentSettings
from hapair.workshop_agent.step_down import StepDowns
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.take_over import TakeOvers
from hapair.workshop_agent.tasks import Tasks
from hapair.workshop_agent.topology_view import TopologyView
from hapair.workshop_agent.vip import VipKeeper
from hapair.workshop_agent.watchdog import WatchdogLink

__all__ = ["Agent", "AgentError"]  # AgentError: what main reports of a refused run

TICK_S = 0.1
SHUTDOWN_TASKS_S = 2.0


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.me = settings.node
        self.log = EventLog("hapair.agent", node=self.me)
        self.store = Store(settings.etcd, timeout=settings.etcd_timeout_s, tls=settings.etcd_tls)
        self.clock = boottime  # every fence deadline, and the watchdog's, on one clock
        self.started_at = self.clock()
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self.tasks = Tasks(self.log, self._stopping)
        # A test's fault only: the views of the nodes and of the topology lag the view of
        # the pairs.
        nodes_lag = float(os.environ.get("HAPAIR_TEST_NODES_LAG_S", "0"))
        topology_lag = float(os.environ.get("HAPAIR_TEST_TOPOLOGY_LAG_S", "0"))
        self.topology = Mirror(
            self.store, keys.PREFIX + "/topology/", self._changed, lag_s=topology_lag
        )
        self.topology_view = TopologyView(self.topology, self.store.describe, self.me, self.log)
        self.pairs = Mirror(self.store, keys.PAIRS_PREFIX, self._changed)
        self.nodes = Mirror(self.store, keys.NODES_PREFIX, self._changed, lag_s=nodes_lag)
        self.observer = PairObserver(self.me, self.log)
        self.netwatch = NetWatch(self.log, self._changed)
        self.members = MemberSets(
            self.observer, self.pairs, self.log, moved=self._lease_changed, spawn=self.tasks.spawn
        )
        self.claim = NodeClaim(self.store, self.me, self.log, self.clock)
        self._newest_epoch: int | None = None
        self.pair: Pair | None = None
        self.node: Node | None = None
        self.term: int | None = None
        self.last_leader: str | None = None
        self._last_reason = ""
        self._state: PairState | None = None
        self._held_pending: frozenset[str] = frozenset()
        self.session: Session | None = None
        self.election: Election | None = None
        self.supervisor: Supervisor | None = None
        self.watchdog: WatchdogLink | None = None
        self.vip: VipKeeper | None = None
        self.database: Database | None = None
        self.fencing: Fencing | None = None
        self.holding: Holding | None = None
        self.db_care: DatabaseCare | None = None
        self.recovery: RecoverySteps | None = None
        self.publisher: Publisher | None = None
        self.steps: StepDowns | None = None
        self.take_overs: TakeOvers | None = None

    # -- plumbing ---------------------------------------------------------------------
    def _changed(self, _: object = None) -> None:
        self._wake.set()
        self._dirty.set()

    def event(self, kind: str, reason: str = "", **details: object) -> None:
        pair = self.pair.name if self.pair else None
        record = Event(
            kind=kind, pair=pair, node=self.me, epoch=self.term, reason=reason, details=details
        )

        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self.store.put(keys.event(time.time_ns(), self.me), record.encode())

        self.tasks.spawn(write(), f"event-{kind}")

    # -- run --------------------------------------------------------------------------
    async def run(self) -> None:
        lock_fd = lock_state_dir(self.settings.state_dir, self.me)
        self.watchdog = WatchdogLink(keep_fds=(lock_fd,))
        self.watchdog.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR2, self.tasks.dump)
        self.log.info(
            "agent starting",
            etcd=self.store.describe,
            pid=os.getpid(),
            state_dir=str(self.settings.state_dir),
        )
        try:
            # First, before anything watches etcd: a refused agent leaves at once.
            await self.tasks.until_stopped(self.claim.claim())
            if not self._stopping.is_set():
                for mirror, name in (
                    (self.topology, "topology"),
                    (self.pairs, "pairs"),
                    (self.nodes, "nodes"),
                ):
                    self.tasks.spawn(mirror.run(), f"mirror-{name}")
                await self.tasks.until_stopped(self._wait_for_topology())
            if not self._stopping.is_set():
                self._begin()
                assert self.publisher is not None
                self.tasks.spawn(self.publisher.run(), "publisher")
                await self.tasks.until_stopped(self._loop())
        finally:
            await self._shutdown()
            self.watchdog.close()
            self.claim.release()
            unlock(lock_fd)

    async def _wait_for_topology(self) -> None:
        said = ""
        while self.pair is None:
            self._load_topology()
            if self.pair is not None:
                break
            why = self.topology_view.why_waiting()
            if why != said:
                self.log.warning(why)
                said = why
            await wait_event(self._wake, 1.0)
            self._wake.clear()

    def _load_topology(self) -> None:
        """Take up a newly applied topology: this node's pair and node in it."""
        site = self.topology_view.load()
        if site is None:
            return
        pair = site.pair_of_node(self.me)
        if pair is None:
            if self.pair is not None:
                self.log.warning("node removed from the topology")
            self.pair, self.node = None, None
            return
        node = pair.node(self.me)
        assert node is not None
        if self.supervisor is not None and (pair != self.pair or node != self.node):
            self.log.info("topology changed; reconciling services")
            self.tasks.spawn(self.supervisor.update(pair, node), "reconcile")
            self.tasks.spawn(self.netwatch.update(pair, node), "network-probes")
            assert self.session is not None
            self.session.retune(pair.failover.lease_ttl_s, pair.failover.fence_after_s)
        self.pair, self.node = pair, node
        self.log.bind(pair=pair.name)

    def _begin(self) -> None:
        assert self.pair is not None and self.node is not None and self.watchdog is not None
        f = self.pair.failover
        self.session = Session(
            self.store, f.lease_ttl_s, f.fence_after_s, self.log, self.clock, self._lease_changed
        )
        self.session.may_regrant = lambda: self.term is None
        self.election = Election(self.store, self.pair.name, self.me)
        ledger = Ledger()  # as the active: the peers' promises during an etcd loss
        self.fencing = Fencing(
            self.session,
            ledger,
            self.clock,
            self.log,
            term=lambda: self.term,
            end_term=self._end_term,
            hold_peers=self._hold_peers,
            fence_margin=lambda: self._failover().fence_margin_s,
            watchdog_deadline=self.watchdog.deadline,
            active_up=lambda: self.supervisor is not None and self.supervisor.active_up(),
            stop_active=self._stop_active,
            event=self.event,
            changed=self._changed,
        )
        self.holding = Holding(
            self.session,
            ledger,
            self.fencing,
            self.netwatch,
            self.clock,
            self.log,
            term=lambda: self.term,
            active=self._acts_as_active,
            stopped=self._stopped,
            newest_epoch=lambda: self._newest_epoch,
            seen_revision=lambda: self.pairs.revision,
            lease_ttl=lambda: self._failover().lease_ttl_s,
            wake=self._wake.set,
            dirty=self._dirty.set,
        )
        self.netwatch.on_hold, self.netwatch.on_hold_reply = (
            self.holding.on_hold,
            self.holding.on_hold_reply,
        )
        self.netwatch.on_release = self.holding.on_release
        env = {
            "HAPAIR_NODE": self.me,
            "HAPAIR_PAIR": self.pair.name,
            "HAPAIR_ETCD": self.settings.etcd,
            **etcd_tls.service_env(self.settings.etcd_tls),
        }
        self.supervisor = Supervisor(
            self.pair,
            self.node,
            self.log,
            self.watchdog,
            self.fencing.may_run,
            lambda: self._pair_state_paused(),
            self._changed,
            self.settings.state_dir,
            env,
            self.clock,
            self.fencing.run_until,
            users=ServiceUsers(
                self.settings.service_user,
                self.settings.service_group,
                self.settings.allow_root_services,
            ),
            event=self.event,
        )
        self.supervisor.start_shared()
        self.vip = VipKeeper(self.log, self.watchdog)
        if self.pair.database is not None:
            self.database = Database(
                self.pair.database, self.pair, self.node, self.election, self.log, self._changed
            )
            self.db_care = DatabaseCare(
                self.database,
                self.supervisor,
                self.watchdog,
                self.log,
                self.me,
                pair=lambda: self.pair,
                term=lambda: self.term,
                state=lambda: self._state,
                may_run=self.fencing.may_run,
                held=lambda: self._held_pending,
                changed=self._changed,
                dirty=self._dirty.set,
                spawn=self.tasks.spawn,
            )
            self.db_care.start()
        self.recovery = RecoverySteps(
            self.store,
            self.election,
            self.pairs,
            self.supervisor,
            self.database,
            self.clock,
            self.log,
            pair=lambda: self.pair,
            term=lambda: self.term,
            event=self.event,
            spawn=self.tasks.spawn,
        )
        self.publisher = Publisher(
            self.store,
            self.election,
            self.session,
            self.supervisor,
            self.netwatch,
            self.database,
            self.clock,
            self.log,
            self.me,
            self._dirty,
            place=lambda: (self.pair, self.node),
            term=lambda: self.term,
            holdoff_until=lambda: self.steps.holdoff_until if self.steps else 0.0,
            lost=lambda: self._state.lost if self._state is not None else (),
            held_by=lambda: self.holding.promised_to if self.holding else None,
        )
        self.steps = StepDowns(
            self.store,
            self.election,
            self.pairs,
            self.supervisor,
            self.vip,
            self.database,
            self.db_care,
            self.publisher,
            self.clock,
            self.log,
            pair=lambda: self.pair,
            term=lambda: self.term,
            end_term=self._end_term,
            state=lambda: self._state,
            event=self.event,
            changed=self._changed,
        )
        self.take_overs = TakeOvers(
            self.session,
            self.election,
            self.pairs,
            self.holding,
            self.recovery,
            self.supervisor,
            self.db_care,
            self.members,
            self.clock,
            self.log,
            self.me,
            pair=lambda: self.pair,
            state=lambda: self._state,
            last_leader=lambda: self.last_leader,
            begin_term=self._begin_term,
            db_ready=self._db_ready,
            event=self.event,
            changed=self._changed,
        )
        self.tasks.spawn(self.session.run(), "session")
        self.tasks.spawn(self.holding.run(), "hold")
        self.tasks.spawn(self.netwatch.update(self.pair, self.node), "network-probes")

    # -- what the parts ask of the agent ----------------------------------------------
    def _pair_state_paused(self) -> bool:
        return self.pair is not None and keys.paused(self.pair.name) in self.pairs.items

    def _failover(self) -> Failover:
        assert self.pair is not None
        return self.pair.failover

    def _lease_changed(self) -> None:
        assert self.fencing is not None
        self.fencing.lease_changed()

    def _valid(self, now: float) -> bool:
        return self.fencing is not None and self.fencing.valid(now)

    def _may_run(self) -> bool:
        return self.fencing is not None and self.fencing.may_run()

    def _hold_peers(self) -> frozenset[str]:
        assert self.pair is not None
        return hold_peers(self.pair, self.me, self.members.acknowledged(self.pair))

    def _end_term(self) -> int | None:
        was, self.term = self.term, None
        return was

    def _stop_active(self) -> None:
        """A fence: clients stop reaching this node before anything else, then every
        active-only service and the database stop."""
        assert self.supervisor is not None and self.pair is not None
        if self.vip is not None:
            self.vip.drop_now()
        self.supervisor.kill_active(self.pair.failover.fence_margin_s / 2)
        if self.db_care is not None:
            self.db_care.fence()

    def _acts_as_active(self) -> bool:
        sup = self.supervisor
        return self.term is not None or (sup is not None and sup.active_up())

    def _stopped(self) -> bool:
        """Out of the active role with every service and the database stopped."""
        sup, care = self.supervisor, self.db_care
        return (
            self.term is None
            and sup is not None
            and not sup.active_up()
            and (care is None or care.stopped())
        )

    def _db_ready(self) -> bool:
        return self.db_care is None or self.db_care.ready(self.term)

    def _vip_step(self) -> None:
        """The pair's virtual address is held exactly while the active services may run."""
        if self.vip is not None:
            spec = self.pair.vip if self.pair is not None else None
            self.vip.update(spec, self._may_run() and self._db_ready())

    # -- the loop ---------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self.fencing is not None and self.recovery is not None
        while True:
            await wait_event(self._wake, TICK_S)
            self._wake.clear()
            self._load_topology()
            self._vip_step()
            if self.pair is None:
                await self._leave_pair()
                continue
            observation = self._observe()
            if not observation.services_up:
                self.fencing.settled()
            decision = d.decide(observation)
            if decision.reason != self._last_reason:
                self.log.info(decision.reason)
                self._last_reason = decision.reason
            for action in decision.actions:
                try:
                    await self._act(action)
                except StoreError as err:
                    self.log.warning(
                        "etcd request failed", action=type(action).__name__, error=str(err)
                    )
                    break
            self.recovery.step()
            self.members.step(self.pair, self.term, self.election)
            if self.netwatch.tick() and self.netwatch.state is not None:
                self.event("network", "; ".join(self.netwatch.state.problems()) or "all clear")

    def _observe(self) -> Observation:
        assert self.pair is not None and self.session is not None and self.supervisor
        assert self.steps is not None and self.holding is not None
        now = self.clock()
        st = self.observer.observe(self.pair, self.pairs.items, self.nodes.items, now)
        if st.leader is not None:
            self.last_leader = st.leader.node
            self._newest_epoch = max(self._newest_epoch or 0, st.leader.epoch)
        held_by = self.holding.held_by(now, self._state.handover if self._state else None)
        self._state = st
        healthy, _ = self.supervisor.healthy()
        return Observation(
            now=now,
            me=self.me,
            pair=self.pair,
            synced=self.pairs.synced.is_set() and self.nodes.synced.is_set(),
            lease=self.session.lease,
            lease_ok=self._valid(now),
            leader=st.leader,
            leader_absent_since=st.leader_absent_since,
            term=self.term,
            services_up=self.supervisor.active_up(),
            failure=self.supervisor.failure,
            db_failure=self.database.failure if self.database else None,
            db_sync=database_care.db_sync(self.pair, self.me, self.pairs.items),
            forced=st.forced,
            healthy=healthy,
            holdoff_until=self.steps.holdoff_until,
            started_at=self.started_at,
            peers=st.peers,
            paused=st.paused,
            drained=st.drained,
            seen_leader=self.last_leader is not None,
            db_eligible=database_care.db_eligible(
                self.pair, self.me, self.pairs.items, self.nodes.items, self.database
            ),
            held_by=held_by,
            left_term=self.steps.left_term,
            forgotten_promises_until=self.claim.forgotten_promises_until(self.pair),
            step_down_unanswered=self.steps.unanswered,
            refused=self.steps.refused(now),
            members=st.members,
            members_revision=st.members_revision,
            switchover=st.switchover,
            handover=st.handover,
            lost=st.lost,
        )

    async def _act(self, action: d.Action) -> None:
        assert self.session is not None and self.election is not None
        assert self.supervisor is not None and self.pair is not None
        assert self.fencing is not None and self.steps is not None
        assert self.take_overs is not None
        match action:
            case d.Fence(reason):
                self.fencing.fence(reason)
            case d.StartServices(epoch):
                if self.term == epoch and self._valid(self.clock()) and self._db_ready():
                    self.supervisor.activate(epoch)
            case d.Campaign(stale, members_revision):
                await self.take_overs.campaign(stale, members_revision)
            case d.Adopt(epoch):
                self.take_overs.take_term(epoch, "took up its own leader key")
            case d.Reclaim(epoch, lease):
                await self.claim.reclaim(
                    self.election, self.pairs, self.pair.name, epoch, lease, self.event
                )
            case d.SettleStepDown():
                await self.steps.settle()
            case d.Resign(reason):
                await self.steps.step_down(reason, None, None)
            case d.Handover(to, request, reason, planned, db_lost):
                await self.steps.step_down(reason, to, request, planned, db_lost)
            case d.RejectSwitchover(request, reason, target):
                await self.steps.reject_switchover(request, reason, target)

    def _begin_term(self, epoch: int, held: frozenset[str]) -> None:
        """A term won or taken up (``take_over.py``) is this agent's from now on."""
        self.term = epoch
        self._newest_epoch = max(self._newest_epoch or 0, epoch)
        self._held_pending = held

    # -- stepping down ----------------------------------------------------------------
    async def _leave_pair(self) -> None:
        if self.term is not None:
            assert self.steps is not None
            await self.steps.step_down("node removed from the topology", None, None)
        if self.supervisor is not None and self.supervisor.active_up():
            await self.supervisor.deactivate()

    # -- shutdown ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.log.info("agent stopping")
        if self.term is not None and self.steps is not None:
            # Bounded: with etcd gone the lease lapses anyway, and the services are stopped
            # first in any case.
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self.steps.step_down("agent shutting down", None, None), 10)
        if self.supervisor is not None:
            await self.supervisor.stop_all()
        if self.fencing is not None:
            self.fencing.cancel()
        await self.tasks.cancel_all(SHUTDOWN_TASKS_S)
        await self.netwatch.close()
        if self.database is not None:
            if self.db_care is not None:
                self.db_care.stop_loop()
            # The database stops with its agent, as every service does.
            await self.database.demote()
            await self.database.close()
        if self.session is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.session.close(), 2)
        if self.vip is not None:
            await self.vip.close()
        await self.store.close()
