"""The agent's loop: observe, decide, act; plus the fence timer that never waits.

Everything that can stall (etcd calls, stopping services) happens here, outside the
pure decision. The fence timer and the watchdog do not depend on this loop making
progress: they stop the services at the fence point whatever the loop is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from shared import keys
from shared.agent_process import local_pid_ns, runs_here, start_ticks
from shared.clock import boottime
from shared.lease import Session
from shared.log import EventLog
from shared.records import (
    Endpoint,
    Event,
    Leader,
    Members,
    NodeStatus,
    RecordError,
    Recovery,
    Role,
    ServiceReport,
    SyncState,
    TopologyDoc,
    decode,
    local_boot_id,
)
from shared.store import Kv, Mirror, Store, StoreError
from shared.topology import Node, Pair, Site, TopologyError, parse_site
from workshop_agent import decide as d
from workshop_agent import recovery
from workshop_agent.database import Database, eligible
from workshop_agent.election import Election
from workshop_agent.hold import Ledger, Promise, Promises
from workshop_agent.netwatch import RESOURCE, NetWatch
from workshop_agent.node_lock import NodeLocked, lock_node, machine_lock, unlock
from workshop_agent.observe import PairObserver, PairState
from workshop_agent.peer_wire import Hold, HoldReply, Release
from workshop_agent.pg.errors import PgError
from workshop_agent.pg.manager import PgManager
from workshop_agent.pg.status import parse_lsn
from workshop_agent.settings import AgentSettings
from workshop_agent.supervisor import Supervisor
from workshop_agent.vip import VipKeeper
from workshop_agent.watchdog import WatchdogLink

TICK_S = 0.1
DB_ROUND_S = 0.5
REFUSED_S = 30.0  # a standby that did not confirm a handover is not chosen again meanwhile
AGENT_REPORT = "hapair-agent"
SHUTDOWN_TASKS_S = 2.0


StepDown = Callable[[], Awaitable[int | None]]  # a resign or handover transaction


class AgentError(Exception):
    """The agent cannot run at all (for example another agent holds this node)."""


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.me = settings.node
        self.log = EventLog("hapair.agent", node=self.me)
        self.store = Store(settings.etcd, timeout=settings.etcd_timeout_s)
        self.clock = boottime  # every fence deadline, and the watchdog's, on one clock
        self.started_at = self.clock()
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        # A test's fault only: the views of the nodes and of the topology lag the view of
        # the pairs.
        nodes_lag = float(os.environ.get("HAPAIR_TEST_NODES_LAG_S", "0"))
        topology_lag = float(os.environ.get("HAPAIR_TEST_TOPOLOGY_LAG_S", "0"))
        self.topology = Mirror(
            self.store, keys.PREFIX + "/topology/", self._changed, lag_s=topology_lag
        )
        self.pairs = Mirror(self.store, keys.PAIRS_PREFIX, self._changed)
        self.nodes = Mirror(self.store, keys.NODES_PREFIX, self._changed, lag_s=nodes_lag)
        self.observer = PairObserver(self.me, self.log)
        self.netwatch = NetWatch(self.log, self._changed)
        self.netwatch.on_hold, self.netwatch.on_hold_reply = self._on_hold, self._on_hold_reply
        self.netwatch.on_release = self._on_release
        self.ledger = Ledger()  # as the active: the peers' promises during an etcd loss
        self.promises = Promises()  # as a standby: those this node gave
        self._campaigning = False
        self._claimed_at = 0.0  # when this run took the node's machine lock
        self._machine_lock: tuple[int, Path] | None = None
        self._previous_run: tuple[int, NodeStatus] | None = None  # lease, status at start
        self._last_refused_reclaim: int | None = None  # for logging changes only
        self._left_term: int | None = None  # the newest term given up by a step-down
        self._unanswered: StepDown | None = None  # that step-down, if etcd did not answer
        self._newest_epoch: int | None = None
        self._held_by: str | None = None  # for logging changes only
        self._promised_to: str | None = None  # the node this one promised not to campaign against
        self._demoting = 0  # fence-time demotions of the database still running
        self._holding = False  # for logging changes only
        self._last_report: tuple[int, bytes] = (0, b"")
        self.site: Site | None = None
        self.pair: Pair | None = None
        self.node: Node | None = None
        self._topology_rev = -1
        self.term: int | None = None
        self.holdoff_until = 0.0
        self.last_leader: str | None = None
        self._last_reason = ""
        self._view_lags: str | None = None  # the switchover waiting for a current view
        self._published: dict[str, bytes] = {}
        self._last_status: tuple[int, bytes] = (0, b"")
        self._fence_timer: asyncio.TimerHandle | None = None
        self._state: PairState | None = None
        self._fencing = False
        self._held_since = 0.0
        self._held_pending: frozenset[str] = frozenset()
        self._contexts_term: int | None = None  # the term whose held contexts were read
        self._catch_up_lsn: int | None = None
        self._refused: dict[str, float] = {}  # handover targets that did not confirm, until
        # Member sets this term sent to etcd whose outcome is unknown, and one in flight.
        self._members_unsure: set[frozenset[str]] = set()
        self._members_writing = False
        self._members_error: str | None = None  # for logging changes only
        self._guarded_pg: int | None = None
        self.database: Database | None = None
        self._db_task: asyncio.Task[None] | None = None
        self._db_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.session: Session | None = None
        self.election: Election | None = None
        self.supervisor: Supervisor | None = None
        self.watchdog: WatchdogLink | None = None
        self.vip: VipKeeper | None = None

    # -- plumbing ---------------------------------------------------------------------
    def _changed(self, _: object = None) -> None:
        self._wake.set()
        self._dirty.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._stopping.is_set():
            return
        if task.cancelled():
            # Only a stop cancels the agent's tasks: anything else is a bug to see.
            self.log.error("internal task cancelled", task=task.get_name())
        elif (err := task.exception()) is not None:
            self.log.exception("internal task failed", err, task=task.get_name())

    def event(self, kind: str, reason: str = "", **details: object) -> None:
        pair = self.pair.name if self.pair else None
        record = Event(
            kind=kind, pair=pair, node=self.me, epoch=self.term, reason=reason, details=details
        )

        async def write() -> None:
            with contextlib.suppress(StoreError):
                await self.store.put(keys.event(time.time_ns(), self.me), record.encode())

        self._spawn(write(), f"event-{kind}")

    # -- run --------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            lock_fd = lock_node(self.settings.state_dir, self.me, self.me)
        except NodeLocked as err:
            raise AgentError(str(err)) from None
        except OSError as err:
            raise AgentError(f"cannot lock node {self.me} in its state directory: {err}") from None
        self.watchdog = WatchdogLink(keep_fds=(lock_fd,))
        self.watchdog.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR2, self._dump_tasks)
        self.log.info(
            "agent starting",
            etcd=self.store.describe,
            pid=os.getpid(),
            state_dir=str(self.settings.state_dir),
        )
        try:
            # First, before anything watches etcd: a refused agent leaves at once.
            await self._until_stopped(self._claim_node())
            if not self._stopping.is_set():
                for mirror, name in (
                    (self.topology, "topology"),
                    (self.pairs, "pairs"),
                    (self.nodes, "nodes"),
                ):
                    self._spawn(mirror.run(), f"mirror-{name}")
                await self._until_stopped(self._wait_for_topology())
            if not self._stopping.is_set():
                self._begin()
                self._spawn(self._publisher(), "publisher")
                await self._until_stopped(self._loop())
        finally:
            await self._shutdown()
            self.watchdog.close()
            if self._machine_lock is not None:
                unlock(*self._machine_lock)
            unlock(lock_fd)

    async def _claim_node(self) -> None:
        """Refuse to run next to another agent of this node, whatever its state directory:
        the machine's lock of this node, and the node's live status in etcd."""
        key = keys.b(keys.node_status(self.me))
        said = ""
        while True:
            try:
                got = await self.store.call(lambda: self.store.client.get_prefix(key))
                break
            except StoreError as err:
                if str(err) != said:
                    self.log.warning(f"waiting for etcd at {self.store.describe}: {err}")
                    said = str(err)
                await asyncio.sleep(0.5)
        try:
            machine = machine_lock(int(got.header.cluster_id), self.me)
        except NodeLocked as err:
            raise AgentError(str(err)) from None
        except OSError as err:
            raise AgentError(f"cannot lock node {self.me} on this machine: {err}") from None
        # The previous run of this agent held that lock until it died: a promise it gave
        # over the peer path ran out one lease TTL after, at the latest.
        self._claimed_at = self.clock()
        for kv in got.kvs:
            with contextlib.suppress(RecordError):
                status = decode(NodeStatus, bytes(kv.value), keys.node_status(self.me))
                if bytes(kv.key) != key or status.pid == os.getpid():
                    continue
                if runs_here(status).runs:
                    unlock(*machine)
                    raise AgentError(
                        f"another hapair-agent runs for node {self.me} (pid {status.pid}, "
                        "named by its live status in etcd)"
                    )
                self._previous_run = (int(kv.lease), status)
        self._machine_lock = machine

    def _previous_run_gone(self, lease: int) -> str | None:
        """Why the run of this node that holds ``lease`` may still be alive (None: gone)."""
        if self._previous_run is None or self._previous_run[0] != lease:
            return "its status was not in etcd when this agent started"
        verdict = runs_here(self._previous_run[1])
        return None if verdict.runs is False else verdict.why

    def _dump_tasks(self) -> None:
        """SIGUSR2: where every task of the agent is waiting, one event per task (for an
        agent that seems stuck; the loop itself answers, or this would not run)."""
        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(limit=12, file=out)
            self.log.warning(
                "task", task=task.get_name(), stack=out.getvalue().replace("\n", " | ")
            )

    async def _until_stopped(self, coro: Coroutine[Any, Any, None]) -> None:
        work = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        for t in (work, stop):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if work.done() and not work.cancelled():
            work.result()

    async def _wait_for_topology(self) -> None:
        said = ""
        while self.pair is None:
            self._load_topology()
            if self.pair is not None:
                break
            if self.topology.error is not None:
                why = f"waiting for etcd at {self.store.describe}: {self.topology.error}"
            elif not self.topology.synced.is_set():
                why = "connecting to etcd"
            elif self.site is None:
                why = "waiting for a valid topology (apply one with: hapair topology apply)"
            else:
                why = f"node {self.me} is not in the applied topology; waiting"
            if why != said:
                self.log.warning(why)
                said = why
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()

    def _load_topology(self) -> None:
        """Parse the topology key when it changed; an invalid one is reported and ignored."""
        kv = self.topology.items.get(keys.TOPOLOGY)
        rev = kv.mod_revision if kv else 0
        if rev == self._topology_rev:
            return
        self._topology_rev = rev
        if kv is None:
            return
        try:
            doc = decode(TopologyDoc, kv.value, kv.key)
            site = parse_site(doc.site, keys.TOPOLOGY)
        except (TopologyError, ValueError) as err:
            self.log.error(
                "invalid topology in etcd; keeping the last valid one",
                problem=str(err).replace("\n", " "),
            )
            return
        self.site = site
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
            self._spawn(self.supervisor.update(pair, node), "reconcile")
            self._spawn(self.netwatch.update(pair, node), "network-probes")
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
        env = {
            "HAPAIR_NODE": self.me,
            "HAPAIR_PAIR": self.pair.name,
            "HAPAIR_ETCD": self.settings.etcd,
        }
        self.supervisor = Supervisor(
            self.pair,
            self.node,
            self.log,
            self.watchdog,
            self._may_run,
            lambda: self._pair_state_paused(),
            self._changed,
            self.settings.state_dir,
            env,
            self.clock,
            self._run_until,
        )
        self.supervisor.start_shared()
        self.vip = VipKeeper(self.log, self.watchdog)
        if self.pair.database is not None:
            self.database = Database(
                self.pair.database, self.pair, self.node, self.election, self.log, self._changed
            )
            self.database.on_postmaster = self._guard_postmaster
            self.database.on_may_be_primary = self._guard_data_dir
            self.database.open()
            self._db_task = asyncio.create_task(self._db_loop(), name="database")
        self._spawn(self.session.run(), "session")
        self._spawn(self._holder(), "hold")
        self._spawn(self.netwatch.update(self.pair, self.node), "network-probes")

    def _pair_state_paused(self) -> bool:
        return self.pair is not None and keys.paused(self.pair.name) in self.pairs.items

    def _may_run(self) -> bool:
        """Checked right before any active-only service is spawned."""
        return self.term is not None and self._valid(self.clock())

    def _run_until(self) -> float:
        """The fence point while this node holds its term and lease, else ``-inf``: an
        active-only service forked now must not start its program after it."""
        s = self.session
        held = self.term is not None and s is not None and s.lease is not None
        return self._fence_point() if held else -float("inf")

    def _valid(self, now: float) -> bool:
        """May this node act as active now: its lease confirmed, or, while etcd cannot
        be reached, every peer's promise not to campaign (``hold.py``)."""
        s = self.session
        return s is not None and s.lease is not None and now < self._fence_point()

    def _fence_point(self) -> float:
        s = self.session
        assert s is not None and self.pair is not None
        point = s.fence_deadline
        if s.lease is not None and self.term is not None and self.ledger.epoch == self.term:
            peers = d.hold_peers(self.pair, self.me, self._acknowledged())
            point = max(point, self.ledger.deadline(peers, s.fence_after))
        return point

    def _acknowledged(self) -> list[frozenset[str] | None]:
        """The member sets etcd may hold for this term: the one this view shows, and
        those sent since whose outcome is unknown."""
        assert self.pair is not None
        shown, _ = self.observer.members(self.pair.name, self.pairs.items)
        return [shown, *self._members_unsure]

    def _members_step(self) -> None:
        """As the active, acknowledge the nodes of the topology it runs as the pair's
        members (a node it lists may campaign only then; one it dropped no longer may)."""
        pair, term, election = self.pair, self.term, self.election
        if pair is None or term is None or election is None or self._members_writing:
            return
        nodes = frozenset(n.name for n in pair.nodes)
        if self.observer.members(pair.name, self.pairs.items)[0] == nodes:
            return
        self._members_writing = True
        self._members_unsure.add(nodes)
        self._lease_changed()  # a hold may need more promises now: the fence point moves
        self._spawn(self._write_members(election, pair.name, term, nodes), "members")

    async def _write_members(
        self, election: Election, pair: str, term: int, nodes: frozenset[str]
    ) -> None:
        try:
            written = await election.write_members(term, nodes)
        except StoreError as err:
            if str(err) != self._members_error:
                self.log.warning("could not acknowledge the pair's members", error=str(err))
            self._members_error = str(err)
            await asyncio.sleep(TICK_S)
            return
        finally:
            self._members_writing = False
        # Answered: etcd holds this set, or the term is over. A set sent earlier whose
        # answer never came was applied before this one or not at all.
        self._members_unsure.clear()
        self._members_error = None
        if written is not None:
            value, revision = written
            key = keys.members(pair)
            self.pairs.apply_local(key, Kv(key, value, revision, revision, 0), revision)
            self.log.info("pair members acknowledged", members=",".join(sorted(nodes)))
        self._lease_changed()  # the promises the hold needs may be fewer now

    # -- the fence timer --------------------------------------------------------------
    def _lease_changed(self) -> None:
        assert self.session is not None and self.watchdog is not None and self.pair is not None
        deadline = self._fence_point()
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None
        margin = self.pair.failover.fence_margin_s
        self.watchdog.deadline(deadline + margin / 2)
        if deadline > -float("inf"):
            self._fence_timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - self.clock()), self._fence_due
            )
        if self.session.lease is None:
            self._fence_due()
        self._changed()

    def _fence_due(self) -> None:
        if self._valid(self.clock()):
            return
        if self.term is not None or (self.supervisor and self.supervisor.active_up()):
            self._fence("lease not confirmed before the fence point")

    def _fence(self, reason: str) -> None:
        assert self.supervisor is not None and self.pair is not None
        was = self.term
        self.term = None
        if was is None and self._fencing:
            return  # the services of this fence are still dying: once is enough
        self._fencing = True
        if self.vip is not None:
            self.vip.drop_now()  # clients stop reaching this node before anything else
        self.supervisor.kill_active(self.pair.failover.fence_margin_s / 2)
        if self.database is not None:
            # Whatever the database step in flight, it must not start the server again.
            if self._db_task is not None:
                self._db_task.cancel()
            self._spawn(self._demote_database(), "database-demote")
        self.log.warning("fenced", reason=reason, epoch=was)
        self.log.bind(epoch=None)
        self.event("fence", reason, epoch=was)
        self._changed()

    # -- riding out an etcd loss (hold.py) --------------------------------------------
    async def _holder(self) -> None:
        """As the active, while etcd does not confirm the lease, ask the peers to hold."""
        session = self.session
        assert session is not None
        asking = False
        asked_for: int | None = None  # the term the peers were asked to hold for
        while True:
            now = self.clock()
            late = session.acked_send is not None and now - session.acked_send > 1.5 * (
                session.interval
            )
            sup, db = self.supervisor, self.database
            stopped = (
                self.term is None
                and sup is not None
                and not sup.active_up()
                and (db is None or (db.primary_epoch is None and not self._demoting))
            )
            if asked_for is not None and stopped:
                # Out of the active role with every service stopped: the peers need not
                # wait out their promises before they may take over.
                self.netwatch.send_release(asked_for)
                self.log.info("peers released from their promises", epoch=asked_for)
                asked_for = None
            if late and self.term is not None and session.lease is not None:
                asked_for = self.term
                sent = self.netwatch.send_hold(self.term, session.ttl)
                if sent is not None:
                    self.ledger.sent(self.term, *sent)
                if not asking:
                    self.log.warning(
                        "etcd does not confirm the lease: asking the peers to hold",
                        peer_path=sent is not None,
                    )
                asking = True
            elif asking:
                asking = False
                self.ledger.clear()
                self._holding = False
                self.log.info(
                    "etcd confirms the lease again: no longer asking the peers"
                    if self.term is not None
                    else "no longer active: no longer asking the peers to hold"
                )
                self._lease_changed()
            await asyncio.sleep(session.interval / 2)

    def _on_hold_reply(self, reply: HoldReply, now: float) -> None:
        assert self.pair is not None
        if self.ledger.answer(reply):
            assert self.session is not None
            holding = self._fence_point() > self.session.fence_deadline
            if holding and not self._holding:
                self.log.warning(
                    "holding the pair on the peers' promises while etcd is unreachable",
                    until_s=round(self._fence_point() - now, 3),
                )
            self._holding = holding
            self._lease_changed()
        elif not reply.promised:
            self.log.warning("peer refused to hold", peer=reply.sender, reason=reply.reason)

    def _on_hold(self, hold: Hold, now: float) -> tuple[bool, str]:
        assert self.pair is not None
        sup = self.supervisor
        busy = None
        if self.term is not None or (sup is not None and sup.active_up()):
            busy = "this node is active"
        elif self._campaigning:
            busy = "this node is campaigning"
        promised, reason = self.promises.answer(
            hold,
            now,
            ttl=self.pair.failover.lease_ttl_s,
            busy=busy,
            newest_epoch=self._newest_epoch,
        )
        if promised:
            self._wake.set()
        return promised, reason

    def _on_release(self, release: Release) -> None:
        self.promises.release(release.sender, release.epoch)
        self._wake.set()

    def _binding_promise(self, now: float) -> Promise | None:
        handover = self._state.handover if self._state else None
        released = [(handover.from_node, handover.epoch)] if handover is not None else []
        return self.promises.binding(now, released)

    def _vip_step(self) -> None:
        """The pair's virtual address is held exactly while the active services may run."""
        if self.vip is not None:
            spec = self.pair.vip if self.pair is not None else None
            self.vip.update(spec, self._may_run() and self._db_ready())

    # -- the loop ---------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()
            self._load_topology()
            self._vip_step()
            if self.pair is None:
                await self._leave_pair()
                continue
            observation = self._observe()
            if not observation.services_up:
                self._fencing = False
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
            self._recovery_step()
            self._members_step()
            if self.netwatch.tick() and self.netwatch.state is not None:
                self.event("network", "; ".join(self.netwatch.state.problems()) or "all clear")

    def _observe(self) -> d.Observation:
        assert self.pair is not None and self.session is not None and self.supervisor
        now = self.clock()
        st = self.observer.observe(self.pair, self.pairs.items, self.nodes.items, now)
        if st.leader is not None:
            self.last_leader = st.leader.node
            self._newest_epoch = max(self._newest_epoch or 0, st.leader.epoch)
        promise = self._binding_promise(now)
        held_by = None if promise is None else f"{promise.node} (epoch {promise.epoch})"
        if held_by != self._held_by:
            if held_by is not None:
                self.log.warning("not campaigning: a peer holds the pair", holder=held_by)
            self._held_by = held_by
            self._promised_to = None if promise is None else promise.node
            self._dirty.set()  # the status names the holder: nodes it does not know wait
        self._state = st
        healthy, _ = self.supervisor.healthy()
        return d.Observation(
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
            db_sync=self._db_sync(),
            forced=st.forced,
            healthy=healthy,
            holdoff_until=self.holdoff_until,
            started_at=self.started_at,
            peers=st.peers,
            paused=st.paused,
            drained=st.drained,
            seen_leader=self.last_leader is not None,
            db_eligible=self._db_eligible(),
            held_by=held_by,
            left_term=self._left_term,
            forgotten_promises_until=(
                self._claimed_at + self.pair.failover.lease_ttl_s
                if self.pair.network is not None
                else -float("inf")
            ),
            step_down_unanswered=self._unanswered is not None,
            refused=frozenset(n for n, until in self._refused.items() if until > now),
            members=st.members,
            members_revision=st.members_revision,
            switchover=st.switchover,
            handover=st.handover,
            lost=st.lost,
        )

    async def _act(self, action: d.Action) -> None:
        assert self.session is not None and self.election is not None
        assert self.supervisor is not None and self.pair is not None
        match action:
            case d.Fence(reason):
                self._fence(reason)
            case d.StartServices(epoch):
                if self.term == epoch and self._valid(self.clock()) and self._db_ready():
                    self.supervisor.activate(epoch)
            case d.Campaign(stale, members_revision):
                await self._campaign(stale, members_revision)
            case d.Adopt(epoch):
                self._take_term(epoch, "took up its own leader key")
            case d.Reclaim(epoch, lease):
                alive = self._previous_run_gone(lease)
                if alive is not None:
                    if self._last_refused_reclaim != epoch:
                        self.log.error(
                            "not taking back the leader key of this node: the run that holds "
                            "it may be alive; waiting for its lease to lapse",
                            why=alive,
                            old_epoch=epoch,
                        )
                        self._last_refused_reclaim = epoch
                    return
                self.log.warning(
                    "taking back the leader key of this node's previous run",
                    old_epoch=epoch,
                    lease=f"{lease:x}",
                )
                revision = await self.election.reclaim(epoch, lease)
                if revision is not None:
                    self.pairs.apply_local(keys.leader(self.pair.name), None, revision)
                    self.event("reclaim", "agent restarted on the active node", old_epoch=epoch)
            case d.SettleStepDown():
                if self._unanswered is not None:
                    await self._send_step_down(self._unanswered)
            case d.Resign(reason):
                await self._step_down(reason, None, None)
            case d.Handover(to, request, reason, planned, db_lost):
                await self._step_down(reason, to, request, planned, db_lost)
            case d.RejectSwitchover(request, reason, target):
                if target is not None and await self._ready_in_etcd(target):
                    if self._view_lags != request:
                        self._view_lags = request
                        self.log.info("switchover target ready in etcd; waiting for this view")
                    return  # decided again once this node's view of the target catches up
                raw = self._state.switchover_raw if self._state else None
                if raw is not None:
                    await self.election.drop_switchover(raw)
                self.log.warning("switchover refused", request=request, reason=reason)
                self.event("switchover_rejected", reason, request=request)

    async def _ready_in_etcd(self, node: str) -> bool:
        """Is ``node`` a healthy, undrained standby by a fresh (linearizable) read?"""
        kvs, _ = await self.store.get_prefix(f"{keys.NODES_PREFIX}{node}/")
        found = {kv.key: kv for kv in kvs}
        kv = found.get(keys.node_status(node))
        if kv is None or keys.drained(node) in found:
            return False
        try:
            status = decode(NodeStatus, kv.value, kv.key)
        except RecordError:
            return False
        return status.healthy and status.role == "standby"

    async def _campaign(self, stale: int | None, members_revision: int) -> None:
        assert self.session is not None and self.election is not None
        lease = self.session.lease
        if lease is None:
            return
        handover = self._state.handover if self._state else None
        target = handover is not None and handover.to == self.me
        # Checked again here, not only in the decision: a promise may have been given
        # since. While the campaign is in flight no promise is given (see _on_hold).
        if self._binding_promise(self.clock()) is not None:
            return
        self._campaigning = True
        try:
            assert self.pair is not None
            members = [n.name for n in self.pair.nodes]
            epoch = await self.election.campaign(lease, stale, target, members, members_revision)
        finally:
            self._campaigning = False
        if epoch is None:
            return
        key = keys.leader(self.pair.name)
        self.pairs.apply_local(
            key, Kv(key, Leader(node=self.me).encode(), epoch, epoch, lease), epoch
        )
        key = keys.members(self.pair.name)
        value = Members(nodes=sorted(members)).encode()
        self.pairs.apply_local(key, Kv(key, value, epoch, epoch, 0), epoch)
        previous = self.last_leader
        planned = target and handover is not None and handover.planned
        self._catch_up_lsn = handover.lsn if target and handover is not None else None
        if target and handover is not None and handover.from_node == self.me:
            cause = "took its pair back after an agent restart"
        elif planned:
            cause = "planned switchover"
        elif self._state is not None and self._state.forced == self.me:
            cause = f"takeover forced by an operator (failover from {previous})"
        elif target and handover is not None:
            cause = f"switch forced by {handover.from_node}"
        elif previous is not None and previous != self.me:
            cause = f"failover from {previous}"
        else:
            cause = "election"
        # After an unplanned failover the process functions marked hold_until_ack wait
        # for an operator; so they do if an earlier recovery was still awaiting one.
        awaiting = self._recovery()
        hold = (not planned and previous is not None) or (
            awaiting is not None and awaiting.state == "awaiting"
        )
        held = recovery.held_services(self.pair, hold)
        self._take_term(epoch, cause, held)
        self.event("election", cause, previous=previous, planned=planned)
        if held:
            record = Recovery(
                epoch=epoch, cause=cause, from_node=previous, to_node=self.me, held=sorted(held)
            )
            self._spawn(self._write_recovery(epoch, record), "recovery")

    def _take_term(self, epoch: int, cause: str, held: frozenset[str] = frozenset()) -> None:
        assert self.session is not None and self.supervisor is not None
        if not self.session.valid(self.clock()):
            return
        self.term = epoch
        self._members_unsure.clear()  # sets sent in an earlier term: overwritten since
        self._newest_epoch = max(self._newest_epoch or 0, epoch)
        self._held_since = self.clock()
        self.log.bind(epoch=epoch)
        self.log.info("became active", cause=cause, held=",".join(sorted(held)) or None)
        self._held_pending = held
        if self._db_ready():
            self.supervisor.activate(epoch, held)
        else:
            self._db_wake.set()  # services start once the database is primary
        self._changed()

    # -- the database -----------------------------------------------------------------
    def _db_ready(self) -> bool:
        return self.database is None or self.database.primary_epoch == self.term

    def _sync_record(self) -> SyncState | None:
        assert self.pair is not None
        kv = self.pairs.items.get(keys.sync_standby(self.pair.name))
        if kv is not None:
            with contextlib.suppress(RecordError):
                return decode(SyncState, kv.value, kv.key)
        return None

    def _db_eligible(self) -> bool:
        assert self.pair is not None
        return eligible(
            self.pair.database,
            self._sync_record(),
            self.me,
            self.pair.nodes[0].name,
            self._received(),
        )

    def _db_sync(self) -> frozenset[str]:
        """The other nodes recorded as holding every commit: the synchronous standbys,
        and the recorded primary when it is not this node (a new active that cannot
        promote hands the pair back to it)."""
        record = self._sync_record()
        if record is None:
            return frozenset()
        sync = set() if record.degraded else set(record.sync)
        return frozenset((sync | {record.primary}) - {self.me})

    def _received(self) -> dict[str, int | None]:
        """Each node's received WAL position, from its published database status; None
        while it still streams: it may have received more since it published (and
        acknowledged commits another standby lacks), so only its final one counts."""
        assert self.pair is not None
        out: dict[str, int | None] = {}
        for n in self.pair.nodes:
            kv = self.nodes.items.get(keys.node_status(n.name))
            try:
                status = decode(NodeStatus, kv.value, kv.key) if kv is not None else None
                db = (status.database or {}) if status else {}
                lsn = None if db.get("streaming") else db.get("receive_lsn")
                out[n.name] = parse_lsn(lsn) if isinstance(lsn, str) else None
            except (RecordError, ValueError):
                out[n.name] = None
        if self.database is not None and self.database.status is not None:
            out[self.me] = self.database.status.receive_lsn
        return out

    def _guard_postmaster(self, pid: int | None) -> None:
        """A primary's postmaster is killed by the watchdog too if this agent freezes:
        by its PID, and whichever serves the data directory then (one restarted in place
        before its PID reaches this method)."""
        assert self.watchdog is not None
        manager = self.database.manager if self.database is not None else None
        if pid is not None:
            self._guard_data_dir()
        elif manager is not None:
            self.watchdog.remove_data_dir(manager.layout.data_dir)
        if self._guarded_pg is not None and self._guarded_pg != pid:
            self.watchdog.remove(self._guarded_pg)
        if pid is not None:  # again for the same PID: it may be another server's by now
            self.watchdog.add(pid)
        self._guarded_pg = pid

    def _guard_data_dir(self) -> None:
        """From before a promotion: the watchdog kills whichever postmaster serves the data
        directory, until the server has stopped (``_guard_postmaster(None)``)."""
        assert self.watchdog is not None
        if self.database is not None and self.database.manager is not None:
            self.watchdog.add_data_dir(self.database.manager.layout.data_dir)

    async def _demote_database(self) -> None:
        assert self.database is not None
        self._demoting += 1
        try:
            await self.database.demote()  # unguarded by the watchdog once stopped
        finally:
            self._demoting -= 1
        self._restart_db_loop()

    def _restart_db_loop(self) -> None:
        """One database loop at a time: a fence and a step-down may both end one, and a
        second loop left running could start the server again after a later fence."""
        if self._db_task is not None and not self._db_task.done():
            self._db_task.cancel()
        self._db_task = asyncio.create_task(self._db_loop(), name="database")

    async def _db_loop(self) -> None:
        """Primary on the active (promoted before any service starts), standby elsewhere."""
        db, sup = self.database, self.supervisor
        assert db is not None and sup is not None and self.pair is not None
        while True:
            try:
                await self._db_round(db, sup)
            except (StoreError, OSError, PgError) as err:
                self.log.warning("database round failed", error=str(err))
            except Exception as err:  # a bug must not end the database's care for good
                self.log.exception("database round failed", err)
            self._dirty.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._db_wake.wait(), DB_ROUND_S)
            self._db_wake.clear()

    async def _db_round(self, db: Database, sup: Supervisor) -> None:
        assert self.pair is not None
        term = self.term
        st = self._state
        if term is not None and db.primary_epoch != term:
            promoted = await db.become_primary(term, self._catch_up_lsn)
            if promoted:
                self._catch_up_lsn = None  # reached; a restart in place has none to reach
            if promoted and self.term == term and self._may_run():
                self._guard_postmaster(db.postmaster)
                sup.activate(term, self._held_pending)
            self._changed()
        elif term is not None:
            up = {n for n, peer in (st.peers.items() if st else []) if peer.role == "standby"}
            await db.keep_primary(term, up)
        elif st is not None and st.leader is not None and st.leader.node != self.me:
            primary = self.pair.node(st.leader.node)
            if primary is not None:
                await db.follow(primary)
        else:
            await db.refresh_status()

    # -- assisted recovery ------------------------------------------------------------
    def _recovery(self) -> Recovery | None:
        assert self.pair is not None
        kv = self.pairs.items.get(keys.recovery(self.pair.name))
        if kv is None:
            return None
        try:
            return decode(Recovery, kv.value, kv.key)
        except RecordError:
            return None

    async def _write_recovery(self, epoch: int, record: Recovery) -> None:
        assert self.election is not None and self.pair is not None
        for _ in range(50):  # etcd may be slow to answer right after a failover
            try:
                written = await self.election.put_guarded(
                    epoch, keys.recovery(self.pair.name), record.encode(), None
                )
            except StoreError:
                await asyncio.sleep(0.2)
                continue
            if written:
                self.log.warning(
                    "awaiting operator" if record.state == "awaiting" else "recovery acknowledged",
                    held=",".join(record.held),
                    cause=record.cause,
                    by=record.acked_by,
                )
                kind = "recovery_awaiting" if record.state == "awaiting" else "ack"
                self.event(kind, record.cause, held=record.held, by=record.acked_by)
            return

    def _read_contexts_once(self, term: int, current: Recovery | None) -> None:
        """Once per holding term, when this node's database is its primary: read where
        each held service would resume and add it to the recovery record."""
        db, pair = self.database, self.pair
        if (
            db is None
            or db.manager is None
            or pair is None
            or db.primary_epoch != term
            or current is None
            or current.epoch != term
            or current.contexts is not None
            or self._contexts_term == term
        ):
            return
        self._contexts_term = term
        names = recovery.process_names(pair, current.held)
        self._spawn(self._publish_contexts(term, db.manager, names), "process-contexts")

    async def _publish_contexts(self, term: int, manager: PgManager, names: dict[str, str]) -> None:
        assert self.pair is not None
        contexts = await recovery.read_contexts(manager, names)
        try:
            written = await recovery.publish_contexts(self.store, self.pair.name, term, contexts)
        except StoreError as err:
            self._contexts_term = None  # read them again on a later round
            self.log.warning("could not publish the held services' contexts", error=str(err))
            return
        if written:
            self.log.info(
                "held services would resume from",
                contexts="; ".join(recovery.describe(c) for c in contexts.values()),
            )

    def _recovery_step(self) -> None:
        """Start held services once acknowledged, or when their auto_ack_after_s is up."""
        sup, pair, term = self.supervisor, self.pair, self.term
        if sup is None or pair is None or term is None or not sup.held:
            return
        current = self._recovery()
        self._read_contexts_once(term, current)
        waited = self.clock() - self._held_since
        due = recovery.release_due(pair, frozenset(sup.held), current, term, waited)
        if not due:
            return
        self.log.info("releasing held services", services=",".join(sorted(due)))
        sup.release(set(due))
        if (
            not sup.held
            and current is not None
            and current.epoch == term
            and (current.state == "awaiting")
        ):
            done = current.model_copy(
                update={"state": "acknowledged", "acked_by": "auto", "acked_at": time.time()}
            )
            self._spawn(self._write_recovery(term, done), "auto-ack")

    async def _step_down(
        self,
        reason: str,
        to: str | None,
        request: str | None,
        planned: bool = True,
        db_lost: bool = False,
    ) -> None:
        """Stop services first, then give the key away: never two actives."""
        assert self.supervisor is not None and self.election is not None
        assert self.pair is not None
        epoch = self.term
        if epoch is None:
            return
        started = self.clock()
        if self.vip is not None:
            await self.vip.release()
        await self.supervisor.deactivate()
        lsn = None
        try:
            if self.database is not None:
                if self._db_task is not None:
                    self._db_task.cancel()
                # A handover hands the database over cleanly, or not at all; a resignation
                # (or a database that cannot run) stops it before another node may
                # promote. The watchdog guards it until it has stopped.
                target = self.pair.node(to) if to is not None else None
                if target is not None and not db_lost:
                    lsn = await self.database.hand_over(target)
                    if lsn is None:
                        await self._handover_aborted(reason, target.name, request)
                        return
                else:
                    await self.database.demote()
            for key, value in list(self._published.items()):
                # Best effort: they go with the lease anyway and carry the old epoch. An
                # etcd error here must not stop the step-down half way.
                with contextlib.suppress(StoreError):
                    await self.election.delete_if(key, value)
                self._published.pop(key, None)
            if self.term != epoch:
                return  # fenced while stopping
            await self._give_away(epoch, reason, to, request, planned, lsn, started)
        finally:
            # Whatever ended the step-down, the database is cared for again.
            if self.database is not None and (self._db_task is None or self._db_task.done()):
                self._restart_db_loop()

    async def _give_away(
        self,
        epoch: int,
        reason: str,
        to: str | None,
        request: str | None,
        planned: bool,
        lsn: int | None,
        started: float,
    ) -> None:
        """The step-down's etcd half: the key given away, once the services stopped."""
        assert self.election is not None and self.pair is not None
        kind = "resign" if to is None else "switchover"
        send: StepDown = (
            partial(self.election.resign, epoch)
            if to is None
            else partial(self.election.handover, epoch, to, request, planned, lsn)
        )
        # Sent, the term is over whatever etcd answers (see decide's left_term).
        self._left_term = epoch
        outcome = await self._send_step_down(send)
        self.term = None
        self.log.bind(epoch=None)
        if to is None or not planned:
            # After a failure, give the others the first chance to take over.
            self.holdoff_until = self.clock() + self.pair.failover.lease_ttl_s
        stopped_ms = round((self.clock() - started) * 1000)
        self.log.info(
            "stepped down", reason=reason, to=to, outcome=outcome, stop_ms=stopped_ms, epoch=epoch
        )
        if self.database is not None:
            self._restart_db_loop()
        self.event(kind, reason, to=to, request=request, epoch=epoch)
        self._changed()

    async def _send_step_down(self, send: StepDown) -> str:
        """Send a step-down transaction. Unanswered, it is kept to be sent again (the
        decision asks for that while the old key shows): never an error that would
        leave the term running on a view of etcd that may lag."""
        assert self.pair is not None
        try:
            revision = await send()
        except StoreError as err:
            if self._unanswered is None:
                self.log.warning(
                    "etcd did not answer the step-down: the term is over anyway; "
                    "sending it again until etcd answers",
                    error=str(err),
                )
            self._unanswered = send
            return "unanswered"
        self._unanswered = None
        if revision is None:
            return "key no longer ours"
        self.pairs.apply_local(keys.leader(self.pair.name), None, revision)
        return "done"

    async def _handover_aborted(self, reason: str, to: str, request: str | None) -> None:
        """The target did not receive the final position: the key stays, the database
        loop starts the primary again, then the services start again."""
        assert self.election is not None
        self._refused[to] = self.clock() + REFUSED_S
        why = f"the database's final position could not be handed to {to}"
        self.log.error("handover aborted: keeping the pair", to=to, reason=reason, why=why)
        self._restart_db_loop()  # first: an etcd error below must not leave it uncared for
        self.event("handover_aborted", why, to=to, cause=reason)
        self._changed()
        raw = self._state.switchover_raw if self._state else None
        if request is not None and raw is not None:
            self.event("switchover_rejected", why, request=request)
            await self.election.drop_switchover(raw)

    async def _leave_pair(self) -> None:
        if self.term is not None:
            await self._step_down("node removed from the topology", None, None)
        if self.supervisor is not None and self.supervisor.active_up():
            await self.supervisor.deactivate()

    # -- publishing -------------------------------------------------------------------
    async def _publisher(self) -> None:
        """Keep the node status and this node's endpoints in etcd in line with reality."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._publish()
            except StoreError as err:
                self.log.debug("publish failed", error=str(err))
                await asyncio.sleep(TICK_S)
                self._dirty.set()
            except Exception as err:  # a bug must not stop publishing for good
                self.log.exception("publish failed", err)
                await asyncio.sleep(TICK_S)
                self._dirty.set()

    async def _publish(self) -> None:
        session, sup, pair, node = self.session, self.supervisor, self.pair, self.node
        if session is None or sup is None or pair is None or node is None:
            return
        lease = session.lease
        if lease is None:
            self._published.clear()
            self._last_status = (0, b"")
            return
        healthy, problems = sup.healthy()
        if self.clock() < self.holdoff_until:
            healthy = False
            problems = [*problems, "stepped down after a failure; holding off"]
        if self._state is not None:
            problems += [f"critical resource {name} lost" for name in sorted(self._state.lost)]
        if self.netwatch.state is not None:
            problems += self.netwatch.state.problems()
        role: Role = "standby"
        if self.term is not None:
            active_states = [r.state for r in sup.runners.values() if r.active_only]
            role = "active" if all(s in ("running", "held") for s in active_states) else "starting"
            if sup.held:
                problems = [*problems, "awaiting operator: " + ", ".join(sorted(sup.held))]
        status = NodeStatus(
            node=self.me,
            pair=pair.name,
            address=node.address,
            role=role,
            epoch=self.term,
            healthy=healthy,
            problems=problems,
            services=sup.statuses(),
            database=(
                self.database.status.model_dump(mode="json")
                if self.database is not None and self.database.status is not None
                else None
            ),
            pid=os.getpid(),
            boot_id=local_boot_id(),
            pid_ns=local_pid_ns(),
            pid_start=start_ticks(),
            held_by=self._promised_to,
        )
        raw = status.model_copy(update={"updated": 0.0}).encode()
        if (lease, raw) != self._last_status:  # a new lease needs the status again
            await self.store.put(keys.node_status(self.me), status.encode(), lease=lease)
            self._last_status = (lease, raw)
        await self._publish_report(lease)
        await self._publish_endpoints(pair, node, lease)

    async def _publish_report(self, lease: int) -> None:
        """The agent's own resources (the network), as any service reports its own."""
        state = self.netwatch.state
        if state is None or self.pair is None or self.pair.network is None:
            return
        iso = self.pair.network.isolation_after_s
        report = ServiceReport(
            service=AGENT_REPORT, resources={RESOURCE: state.resource(self.term is not None, iso)}
        )
        raw = report.model_copy(update={"at": 0.0}).encode()
        if (lease, raw) != self._last_report:
            await self.store.put(keys.report(self.me, AGENT_REPORT), report.encode(), lease=lease)
            self._last_report = (lease, raw)

    async def _publish_endpoints(self, pair: Pair, node: Node, lease: int) -> None:
        assert self.supervisor is not None and self.election is not None
        epoch = self.term
        wanted: dict[str, bytes] = {}
        if epoch is not None:
            for spec in self.supervisor.running_with_endpoint():
                assert spec.endpoint is not None
                wanted[keys.endpoint(spec.name)] = Endpoint(
                    service=spec.name,
                    pair=pair.name,
                    node=self.me,
                    host=spec.endpoint.host or node.address,
                    port=spec.endpoint.port,
                    protocol=spec.endpoint.protocol,
                    epoch=epoch,
                ).encode()
        db = self.database
        if epoch is not None and db is not None and db.primary_epoch == epoch:
            wanted[keys.endpoint(db.endpoint_name)] = Endpoint(
                service=db.endpoint_name,
                pair=pair.name,
                node=self.me,
                host=node.address,
                port=db.config.port,
                protocol="postgresql",
                epoch=epoch,
            ).encode()
        for key, value in wanted.items():
            if self._published.get(key) != value:
                assert epoch is not None
                if await self.election.put_guarded(epoch, key, value, lease):
                    self._published[key] = value
                    self.log.info("endpoint published", endpoint=key.rsplit("/", 1)[-1])
        for key in set(self._published) - set(wanted):
            # A step-down may have removed it meanwhile: both run across awaits.
            value = self._published.pop(key, b"")
            if value:
                await self.election.delete_if(key, value)

    # -- shutdown ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.log.info("agent stopping")
        if self.term is not None:
            # Bounded: with etcd gone the lease lapses anyway, and the services are stopped
            # first in any case.
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self._step_down("agent shutting down", None, None), 10)
        if self.supervisor is not None:
            await self.supervisor.stop_all()
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: a task stuck in a library that swallows its cancellation must not
            # keep the agent from stopping (its services are already stopped).
            _, stuck = await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_TASKS_S)
            if stuck:
                self.log.warning("tasks did not stop", tasks=",".join(t.get_name() for t in stuck))
        await self.netwatch.close()
        if self.database is not None:
            if self._db_task is not None:
                self._db_task.cancel()
            # The database stops with its agent, as every service does.
            await self.database.demote()
            await self.database.close()
        if self.session is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.session.close(), 2)
        if self.vip is not None:
            await self.vip.close()
        await self.store.close()
