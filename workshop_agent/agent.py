"""The agent's loop: observe, decide, act; plus the fence timer that never waits.

Everything that can stall (etcd calls, stopping services) happens here, outside the
pure decision. The fence timer and the watchdog do not depend on this loop making
progress: they stop the services at the fence point whatever the loop is doing.

The parts are built in ``assembly.py`` once the pair is known, each told what it needs
(callbacks, not this class; ``assembly.Core`` names them all): ``fencing.py`` (the
fence point and timer), ``holding.py`` (riding out an etcd loss on the peers'
promises), ``members.py`` (the pair's member sets), ``database_care.py`` (the
database's loop and guard), ``recovery_steps.py`` (assisted recovery), ``step_down.py``
(resigning and handing over), ``take_over.py`` (campaigns and terms taken up),
``publisher.py`` (the node's records in etcd), ``claim.py`` (one run per node),
``topology_view.py`` and ``tasks.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from hapair.shared import keys, metrics
from hapair.shared.clock import PAST_DUE_S, boottime
from hapair.shared.log import EventLog
from hapair.shared.metrics import MetricsOptions
from hapair.shared.mirror import Mirror
from hapair.shared.records import Event
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Node, Pair
from hapair.shared.waits import wait_event
from hapair.workshop_agent import database_care
from hapair.workshop_agent import decide as d
from hapair.workshop_agent.assembly import Parts, assemble, start
from hapair.workshop_agent.candidates import beat_peers, hold_peers
from hapair.workshop_agent.claim import AgentError, NodeClaim, lock_state_dir
from hapair.workshop_agent.members import MemberSets
from hapair.workshop_agent.metrics import AgentCollector
from hapair.workshop_agent.netwatch import NetWatch
from hapair.workshop_agent.node_lock import unlock
from hapair.workshop_agent.observation import Observation
from hapair.workshop_agent.observe import PairObserver, PairState
from hapair.workshop_agent.settings import AgentSettings
from hapair.workshop_agent.tasks import Tasks
from hapair.workshop_agent.term_beat import NONE, TakeoverGuard
from hapair.workshop_agent.topology_view import TopologyView
from hapair.workshop_agent.watchdog import WatchdogLink

__all__ = ["Agent", "AgentError"]  # AgentError: what main reports of a refused run

IDLE_S = 1.0
"""The longest the loop waits for news with no decision due. What changes with no news
and has no instant of its own (a member-set write retried, a restart request carried
out) is looked at again by then."""
RETRY_S = 0.1
"""A round that acted runs again this soon: an action that changed nothing yet (etcd
did not answer, the database is not ready) is tried again at once."""
SHUTDOWN_TASKS_S = 2.0


class Agent:
    def __init__(self, settings: AgentSettings, scraping: MetricsOptions | None = None) -> None:
        self.settings = settings
        self.scraping = scraping  # --metrics-listen and its TLS files, when given
        self.me = settings.node
        self.log = EventLog("hapair.agent", node=self.me)
        self.store = Store(settings.etcd, timeout=settings.etcd_timeout_s, tls=settings.etcd_tls)
        self.clock = boottime  # every fence deadline, and the watchdog's, on one clock
        self.started_at = self.clock()
        self.wake = asyncio.Event()
        self.dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self.tasks = Tasks(self.log, self._stopping)
        # A test's fault only: the views of the nodes and of the topology lag the view of
        # the pairs.
        nodes_lag = float(os.environ.get("HAPAIR_TEST_NODES_LAG_S", "0"))
        topology_lag = float(os.environ.get("HAPAIR_TEST_TOPOLOGY_LAG_S", "0"))
        self.topology = Mirror(
            self.store, keys.PREFIX + "/topology/", self.changed, lag_s=topology_lag
        )
        self.topology_view = TopologyView(self.topology, self.store.describe, self.me, self.log)
        self.pairs = Mirror(self.store, keys.PAIRS_PREFIX, self.changed)
        self.nodes = Mirror(self.store, keys.NODES_PREFIX, self.changed, lag_s=nodes_lag)
        self.observer = PairObserver(self.me, self.log)
        self.netwatch = NetWatch(self.log, self.changed)
        self.members = MemberSets(
            self.observer,
            self.pairs,
            self.log,
            moved=self.lease_changed,
            spawn=self.tasks.spawn,
            ready=lambda nodes: self.parts is None or self.parts.beating.covers(nodes),
        )
        self.claim = NodeClaim(self.store, self.me, self.log, self.clock)
        # Events are filed under this agent's etcd user (its node name, in its certificate).
        self.writer = self.store.identity or self.me
        self.newest_epoch: int | None = None
        # The pair and node this agent's parts serve: the topology's, and once this node
        # is taken out of it, still the last ones (the term it may hold is that pair's).
        self.pair: Pair | None = None
        self.node: Node | None = None
        self.in_topology = False  # whether the applied topology names this node
        self.term: int | None = None
        self.last_leader: str | None = None
        self._last_reason = ""
        self.state: PairState | None = None
        self.held_pending: frozenset[str] = frozenset()
        self.watchdog: WatchdogLink | None = None
        self.parts: Parts | None = None  # once the pair is known (assembly.py)

    # -- plumbing ---------------------------------------------------------------------
    def changed(self, _: object = None) -> None:
        self.wake.set()
        self.dirty.set()

    def event(self, kind: str, reason: str = "", **details: object) -> None:
        pair = self.pair.name if self.pair else None
        record = Event(
            kind=kind, pair=pair, node=self.me, epoch=self.term, reason=reason, details=details
        )

        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self.store.put(keys.event(time.time_ns(), self.writer), record.encode())

        self.tasks.spawn(write(), f"event-{kind}")

    # -- run --------------------------------------------------------------------------
    async def run(self) -> None:
        lock_fd = lock_state_dir(self.settings.state_dir, self.me)
        settings = self.settings
        # The watchdog one priority above the agent: it must kill even an agent that spins.
        realtime = settings.realtime_priority and settings.realtime_priority + 1
        self.watchdog = WatchdogLink((lock_fd,), settings.etcd, settings.etcd_tls, realtime)
        self.watchdog.start()
        if self.watchdog.realtime_refused is not None:
            self.log.warning(
                "real-time scheduling of the watchdog refused: a busy server may delay "
                "its kill past the deadline",
                reason=self.watchdog.realtime_refused,
            )
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
        scraped: asyncio.Server | None = None
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
                if self.scraping is not None:
                    reg = metrics.registry(AgentCollector(self))
                    scraped = await metrics.serve(self.scraping, reg, self.log)
                await self.tasks.until_stopped(self._loop())
        finally:
            if scraped is not None:
                scraped.close()
            await self._shutdown()
            self.watchdog.close()
            self.claim.release()
            unlock(lock_fd)

    async def _wait_for_topology(self) -> None:
        said = ""
        while not self.in_topology:
            self._load_topology()
            if self.in_topology:
                break
            why = self.topology_view.why_waiting()
            if why != said:
                self.log.warning(why)
                said = why
            await wait_event(self.wake, 1.0)
            self.wake.clear()

    def _load_topology(self) -> None:
        """Take up a newly applied topology: this node's pair and node in it."""
        site = self.topology_view.load()
        if site is None:
            return
        pair = site.pair_of_node(self.me)
        if pair is None:
            if self.in_topology:
                self.log.warning("node removed from the topology")
            self.in_topology = False
            return
        if not self.in_topology and self.parts is not None:
            self.log.info("node back in the topology")
        self.in_topology = True
        node = pair.node(self.me)
        assert node is not None
        if self.parts is not None and (pair != self.pair or node != self.node):
            self.log.info("topology changed; reconciling services")
            self.tasks.spawn(self.parts.supervisor.update(pair, node), "reconcile")
            self.tasks.spawn(self.netwatch.update(pair, node), "network-probes")
            self.parts.session.retune(pair.failover.lease_ttl_s, pair.failover.fence_after_s)
            self.parts.beating.watch(self.tasks.spawn, pair)
        said = [] if self.pair is None else self.pair.cautions()
        self.pair, self.node = pair, node
        self.log.bind(pair=pair.name)
        if pair.cautions() != said:
            for caution in pair.cautions():
                self.log.warning("the pair's settings have a cost", caution=caution)

    def _begin(self) -> None:
        assert self.pair is not None and self.node is not None and self.watchdog is not None
        self.parts = assemble(self, self.pair, self.node, self.watchdog)
        start(self.parts, self.tasks.spawn, self.pair, self.node, self.netwatch)

    # -- what the parts ask of the agent (assembly.Core) ------------------------------
    def paused(self) -> bool:
        return self.pair is not None and keys.paused(self.pair.name) in self.pairs.items

    def lease_changed(self) -> None:
        if self.parts is not None:
            self.parts.fencing.lease_changed()

    def _may_run(self) -> bool:
        return self.parts is not None and self.parts.fencing.may_run()

    def hold_peers(self) -> frozenset[str]:
        # A node taken out of the topology counts on nobody's promise: its fence point
        # is then the lease's and the beats' alone, never later.
        if not self.in_topology:
            return frozenset()
        assert self.pair is not None
        return hold_peers(self.pair, self.me, self.members.acknowledged(self.pair))

    def beat_peers(self) -> frozenset[str]:
        if not self.in_topology:
            return frozenset()
        assert self.pair is not None
        return beat_peers(self.pair, self.me, self.members.acknowledged(self.pair))

    def begin_term(self, epoch: int, held: frozenset[str]) -> None:
        """A term won or taken up (``take_over.py``) is this agent's from now on."""
        self.term = epoch
        self.newest_epoch = max(self.newest_epoch or 0, epoch)
        self.held_pending = held

    def end_term(self) -> int | None:
        was, self.term = self.term, None
        return was

    def stop_active(self) -> None:
        """A fence: clients stop reaching this node before anything else, then every
        active-only service and the database stop."""
        p = self._parts()
        assert self.pair is not None
        p.vip.drop_now()
        p.supervisor.kill_active(self.pair.failover.fence_margin_s / 2)
        if p.db_care is not None:
            p.db_care.fence()

    def acts_as_active(self) -> bool:
        return self.term is not None or (
            self.parts is not None and self.parts.supervisor.active_up()
        )

    def stopped(self) -> bool:
        """Out of the active role with every service and the database stopped."""
        p = self.parts
        return (
            self.term is None
            and p is not None
            and not p.supervisor.active_up()
            and (p.db_care is None or p.db_care.stopped())
        )

    def db_ready(self) -> bool:
        care = self.parts.db_care if self.parts is not None else None
        return care is None or care.ready(self.term)

    def _parts(self) -> Parts:
        assert self.parts is not None, "the pair's parts are built before the loop runs"
        return self.parts

    def _vip_step(self) -> None:
        """The pair's virtual address is held exactly while the active services may run."""
        if self.parts is not None:
            spec = self.pair.vip if self.pair is not None and self.in_topology else None
            self.parts.vip.update(spec, self._may_run() and self.db_ready())

    # -- the loop ---------------------------------------------------------------------
    async def _loop(self) -> None:
        """A round on any news (a watch event, a health result, a command, a peer's
        message, the lease confirmed), else when a time-driven decision is due
        (``decide.due``), at the latest after ``IDLE_S``."""
        p = self._parts()
        wait = 0.0
        while True:
            await wait_event(self.wake, wait)
            self.wake.clear()
            wait = IDLE_S
            self._load_topology()
            self._vip_step()
            if not self.in_topology:
                await self._leave_pair()
                continue
            observation = self._observe(p)
            if not observation.services_up:
                p.fencing.settled()
            decision = d.decide(observation)
            if decision.reason != self._last_reason:
                self.log.info(decision.reason)
                self._last_reason = decision.reason
            for action in decision.actions:
                try:
                    await self._act(p, action)
                except StoreError as err:
                    self.log.warning(
                        "etcd request failed", action=type(action).__name__, error=str(err)
                    )
                    break
            p.recovery.step()
            p.restarts.step()
            self.members.step(self.pair, self.term, p.election)
            if self.netwatch.tick() and self.netwatch.state is not None:
                self.event("network", "; ".join(self.netwatch.state.problems()) or "all clear")
            wait = RETRY_S if decision.actions else self._until_due(p, observation)

    def _until_due(self, p: Parts, o: Observation) -> float:
        """How long the next round may wait for news: until the decision or a held
        service's release is due, or the network probes' verdict changes by silence
        alone, at most ``IDLE_S``; an answer that changes the verdict is read at the
        probes' interval."""
        assert self.pair is not None
        longest = IDLE_S
        if self.pair.network is not None:
            longest = min(longest, self.pair.network.probe_interval_s)
        wait = min(d.due(o), p.recovery.due()) - self.clock()
        verdict = self.netwatch.due_in()
        if verdict is not None:
            wait = min(wait, verdict)
        return min(max(wait, 0.0) + PAST_DUE_S, longest)

    def _observe(self, p: Parts) -> Observation:
        assert self.pair is not None
        now = self.clock()
        st = self.observer.observe(self.pair, self.pairs.items, self.nodes.items, now)
        if st.leader is not None:
            self.last_leader = st.leader.node
            self.newest_epoch = max(self.newest_epoch or 0, st.leader.epoch)
        held_by = p.holding.held_by(now, st.handover)
        self.state = st
        beat_at, beat_guard = self._beat_takeover(p, st, now)
        healthy, _ = p.supervisor.healthy()
        return Observation(
            now=now,
            me=self.me,
            pair=self.pair,
            synced=self.pairs.synced.is_set() and self.nodes.synced.is_set(),
            lease=p.session.lease,
            lease_ok=p.fencing.valid(now),
            leader=st.leader,
            leader_absent_since=st.leader_absent_since,
            term=self.term,
            services_up=p.supervisor.active_up(),
            failure=p.supervisor.failure,
            db_failure=p.database.failure if p.database else None,
            db_sync=database_care.db_sync(self.pair, self.me, self.pairs.items),
            forced=st.forced,
            healthy=healthy,
            holdoff_until=p.steps.holdoff_until,
            started_at=self.started_at,
            peers=st.peers,
            paused=st.paused,
            drained=st.drained,
            seen_leader=self.last_leader is not None,
            db_eligible=database_care.db_eligible(
                self.pair, self.me, self.pairs.items, self.nodes.items, p.database
            ),
            held_by=held_by,
            left_term=p.steps.left_term,
            forgotten_promises_until=self.claim.forgotten_promises_until(self.pair),
            step_down_unanswered=p.steps.unanswered,
            refused=p.steps.refused(now),
            lease_ok_until=p.fencing.loop_point(),
            view_expires_at=min(p.steps.refused_until(now), p.holding.held_until),
            members=st.members,
            members_revision=st.members_revision,
            lacks=p.packages.lacking(self.pair),
            switchover=st.switchover,
            handover=st.handover,
            lost=st.lost,
            beat_takeover_at=beat_at,
            beat_guard=beat_guard,
        )

    def _beat_takeover(
        self, p: Parts, st: PairState, now: float
    ) -> tuple[float, TakeoverGuard | None]:
        """When this standby may end the active's term by its stopped beats, and the
        guard of that takeover, read from the same view of the pair's keys."""
        assert self.pair is not None
        leader = st.leader
        if leader is None or leader.node == self.me or self.term is not None:
            return float("inf"), None
        promise = p.holding.binding(now, st.handover)
        at = p.beating.due(leader.epoch, NONE if promise is None else promise.until)
        if at == float("inf"):
            return at, None
        items, name = self.pairs.items, self.pair.name

        def revision(key: str) -> int:
            kv = items.get(key)
            return 0 if kv is None else kv.mod_revision

        guard = p.beating.guard(
            leader.epoch,
            st.members_revision,
            revision(keys.sync_standby(name)),
            revision(keys.paused(name)),
        )
        return at, guard

    async def _act(self, p: Parts, action: d.Action) -> None:
        assert self.pair is not None
        match action:
            case d.Fence(reason):
                p.fencing.fence(reason)
            case d.StartServices(epoch):
                if self.term == epoch and p.fencing.valid(self.clock()) and self.db_ready():
                    p.supervisor.activate(epoch)
            case d.Campaign(stale, members_revision, beat):
                await p.take_overs.campaign(stale, members_revision, beat)
            case d.Adopt(epoch, renewable):
                await p.take_overs.adopt(epoch, "took up its own leader key", renewable)
            case d.Reclaim(epoch, lease):
                await self.claim.reclaim(
                    p.election, self.pairs, self.pair.name, epoch, lease, self.event
                )
            case d.SettleStepDown():
                await p.steps.settle()
            case d.Resign(reason):
                await p.steps.step_down(reason, None, None)
            case d.Handover(to, request, reason, planned, db_lost):
                await p.steps.step_down(reason, to, request, planned, db_lost)
            case d.RejectSwitchover(request, reason, target, lacks):
                await p.steps.reject_switchover(request, reason, target, lacks)

    # -- stepping down ----------------------------------------------------------------
    async def _leave_pair(self) -> None:
        """Out of the topology, this node holds no term and runs nothing: it steps down
        as on any other reason, and waits to be named again."""
        p = self._parts()
        if self.term is not None:
            await p.steps.step_down("node removed from the topology", None, None)
        elif p.steps.unanswered:
            await p.steps.settle()
        if p.supervisor.active_up():
            await p.supervisor.deactivate()

    # -- shutdown ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.log.info("agent stopping")
        p = self.parts
        if self.term is not None and p is not None:
            # Bounded: with etcd gone the lease lapses anyway, and the services are stopped
            # first in any case.
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(p.steps.step_down("agent shutting down", None, None), 10)
        if p is not None:
            await p.supervisor.stop_all()
            p.fencing.cancel()
        await self.tasks.cancel_all(SHUTDOWN_TASKS_S)
        await self.netwatch.close()
        if p is not None and p.database is not None:
            if p.db_care is not None:
                p.db_care.stop_loop()
            # The database stops with its agent, as every service does.
            await p.database.demote()
            await p.database.close()
        if p is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.session.close(), 2)
            await p.vip.close()
        await self.store.close()
