"""The node's role, as the comm server must act on it, and its report to the agent.

The comm server serves as the active (high ServiceLevel, writes to PLCs) only while
all of this holds:

- the pair's leader key names this node (its create_revision is the epoch);
- its own etcd lease is fresh: a keepalive it *sent* less than ``ttl - margin`` ago was
  acknowledged (the agent's self-fencing rule, applied to the comm server's claim);
- it has *claimed* the term: its report, written in a transaction guarded by the
  leader key's create_revision, says ``serving``, and no other node's comm server of
  this service said so when it claimed.

A claim is made only from a complete view: the leader key, every node's reports and
the topology (which names the pair's nodes) all read from etcd, and the transaction
checks that the report of every other node of the pair is exactly as seen, a report
seen absent included. So a report the view has not caught up with (a slow first read,
a lagging watch) refuses the claim instead of being ignored.

The claim is what orders a failover for OPC UA clients: the new active's comm server
rises only after the old one has written that it stopped serving, or after the old
one's report vanished with its lease (then the old one had stopped itself first: it
drops at ``ttl - margin`` without an acknowledged keepalive, etcd drops the lease at
``ttl`` at the earliest). So the old node's ServiceLevel always falls before the new
node's rises, and two nodes never accept writes at the same time. A write is allowed
only if ``serving`` holds in the instant its request is handed to the socket (see the
drivers), so the margin covers nothing but the request's way through the network.

The report (``/nodes/{node}/reports/{service}``, bound to the comm server's own lease)
is a :class:`hapair.shared.records.ResourceReport` with one resource per PLC
(``plc:{name}``: ``ok`` when this node reaches it) plus the comm server's own fields:
role, serving, epoch and every PLC's path health.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from pydantic import Field

from hapair.comm_server.source import PairError, stored_pair
from hapair.shared import keys
from hapair.shared.clock import Clock, boottime
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.plcs import PlcHealth
from hapair.shared.records import Leader, RecordError, Resource, ResourceReport, decode
from hapair.shared.store import LeaseNotFound, Store, StoreError
from hapair.shared.txn import Compare, Op

ReportParts = tuple[dict[str, Resource], dict[str, PlcHealth]]

FENCE_MARGIN_S = 0.5
STOP_TASKS_S = 2.0  # how long a stop waits for the role's watches and lease to end


class CommReport(ResourceReport):
    """What the comm server reports; the agent reads it as a plain ResourceReport."""

    node: str = ""
    role: str = "standby"
    serving: bool = False
    epoch: int | None = None
    plcs: dict[str, PlcHealth] = Field(default_factory=dict)


class StaticRole:
    """Without etcd (``--standalone``): always the active, never a pair."""

    serving = True
    epoch: int | None = None
    state = "active"

    async def run(self) -> None:
        await asyncio.Event().wait()

    def poke(self) -> None:
        pass

    async def close(self) -> None:
        pass


class PairRole:
    def __init__(
        self,
        store: Store,
        pair: str,
        node: str,
        service: str,
        parts: Callable[[], ReportParts],
        on_change: Callable[[], None],
        log: EventLog,
        ttl: float = 2.0,
        margin: float = FENCE_MARGIN_S,
        refresh_s: float = 5.0,
        clock: Clock = boottime,
    ) -> None:
        self.store = store
        self.clock = clock  # of the fence: it must count a suspend (see shared/clock.py)
        self.pair, self.node, self.service = pair, node, service
        self.log = log
        self.refresh_s = refresh_s
        self._parts = parts
        self._on_change = on_change
        self.leader_key = keys.leader(pair)
        self.report_key = keys.report(node, service)
        self._leaders = Mirror(store, self.leader_key, self._mirror_changed)
        self._reports = Mirror(store, keys.NODES_PREFIX, self._mirror_changed)
        self._topology = Mirror(store, keys.TOPOLOGY, self._mirror_changed)
        self._topology_rev = -1  # the topology's mod_revision the peers were read from
        self._peers: list[str] | None = None  # the pair's other nodes, None: unknown
        self._peers_problem = "the topology is not read yet"
        self._wake = asyncio.Event()
        # The claim's own fence: the agent's rule, ``ttl - margin`` from the send of the
        # last acknowledged keepalive.
        self.session = Session(
            store, ttl, ttl - margin, log, clock, self._lease_changed, name="report lease"
        )
        self._lease_seen: int | None = None  # the lease the reports are written on
        self._writing_on: int | None = None  # the lease of the write in flight
        self._fence: asyncio.TimerHandle | None = None
        self._serving = False
        self.epoch: int | None = None
        self.state = "unknown"
        self.reason = "starting"
        self._written: bytes = b""  # the last report's significant content
        self._written_at = 0.0
        self._errors: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- what the rest of the comm server asks ----------------------------------------
    @property
    def serving(self) -> bool:
        """True only while claimed *and* the lease is fresh; checked on every write."""
        return self._serving and self._fresh()

    def poke(self) -> None:
        """Something changed (health, etcd): reconcile and report soon."""
        self._wake.set()

    # -- running ----------------------------------------------------------------------
    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(self._leaders.run(), name="leader watch"),
            asyncio.create_task(self._reports.run(), name="reports watch"),
            asyncio.create_task(self._topology.run(), name="topology watch"),
            asyncio.create_task(self.session.run(), name="comm lease"),
        ]
        try:
            while True:
                with contextlib.suppress(TimeoutError):  # refresh the report now and then
                    async with asyncio.timeout(self.refresh_s):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    await self._reconcile()
                except StoreError as err:
                    if isinstance(err, LeaseNotFound) and self._writing_on is not None:
                        self.session.lost(self._writing_on)  # etcd dropped it: a new one
                    else:
                        self._warn_once("etcd unavailable", str(err))
                    await asyncio.sleep(0.2)
                    self._wake.set()
        finally:
            for task in self._tasks:
                task.cancel()
            # Bounded: a watch stuck in a library that swallows its cancellation (gRPC
            # and aetcd have such code) must not keep the comm server from stopping.
            done, _ = await asyncio.wait(self._tasks, timeout=STOP_TASKS_S)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: its end is expected here, not an error

    async def close(self) -> None:
        """Stop serving and take the report away, so a peer may rise at once."""
        self._closed = True  # never to rise again, whatever the watches still say
        self._become("stopping", None, "comm server stopping")
        for task in self._tasks:
            task.cancel()
        await self.session.close()

    # -- the decision -----------------------------------------------------------------
    def _leader(self) -> tuple[str, int] | None:
        if not self._leaders.synced.is_set():
            return None
        kv = self._leaders.items.get(self.leader_key)
        if kv is None:
            return None
        try:
            return decode(Leader, kv.value, kv.key).node, kv.create_revision
        except RecordError:
            return ("?", kv.create_revision)  # garbage still holds the key: not ours

    def _fresh(self) -> bool:
        # On CLOCK_BOOTTIME, which counts a suspend: after one longer than the lease, the
        # role is not fresh any more, however recent the last keepalive looks otherwise.
        return self.session.valid(self.clock())

    def _read_peers(self) -> None:
        """The pair's other nodes from the topology, parsed when it changed; an invalid
        topology is reported and the nodes read before are kept."""
        kv = self._topology.items.get(keys.TOPOLOGY)
        revision = kv.mod_revision if kv is not None else 0
        if revision == self._topology_rev:
            return
        self._topology_rev = revision
        try:
            pair = stored_pair(kv.value if kv is not None else None, self.pair)
        except PairError as err:
            if kv is None or self._peers is None:
                self._peers, self._peers_problem = None, str(err)
            self.log.error("the pair's nodes are unknown", problem=str(err))
            return
        names = [n.name for n in pair.nodes]
        if self.node in names:
            self._peers = [n for n in names if n != self.node]
        else:
            self._peers = None
            self._peers_problem = f"node {self.node} is not in pair {self.pair}"

    def _others(self, peers: list[str]) -> dict[str, tuple[int, bool]]:
        """The peers' reports of this service: key -> (mod_revision, serving); a report
        not there has mod_revision 0."""
        found = {}
        for peer in peers:
            key = keys.report(peer, self.service)
            kv = self._reports.items.get(key)
            if kv is None:
                found[key] = (0, False)
                continue
            try:
                serving = decode(CommReport, kv.value, key).serving
            except RecordError:
                serving = False  # not a comm server's report
            found[key] = (kv.mod_revision, serving)
        return found

    def _settle(self) -> bool:
        """Every step down, decided at once and without I/O (an etcd call may hang for
        its whole timeout; stepping down must not wait for it). True if ours to serve."""
        if self._closed:
            return False
        leader = self._leader()
        if not self._leaders.synced.is_set():
            self._become("unknown", None, "etcd unreachable")
        elif not self._fresh():
            self._become("unknown", None, "report lease not renewed in time")
        elif leader is None or leader[0] != self.node:
            self._become("standby", None, "another node is active" if leader else "no active node")
        elif self._serving and self.epoch != leader[1]:
            self._become("waiting", None, f"new term {leader[1]}")  # to be claimed afresh
            return True
        else:
            return True
        return False

    async def _reconcile(self) -> None:
        if not self._settle():
            if not self._closed:
                await self._report()
            return
        leader = self._leader()
        if leader is not None and not self._serving:
            await self._rise(leader[1])
        await self._report()

    async def _rise(self, epoch: int) -> None:
        """Our term: serve once no other comm server of the service does."""
        if not (self._reports.synced.is_set() and self._topology.synced.is_set()):
            self._become("waiting", None, "reading the other nodes' reports")
            return
        self._read_peers()
        if self._peers is None:
            self._become("waiting", None, f"the pair's nodes are unknown: {self._peers_problem}")
            return
        others = self._others(self._peers)
        busy = sorted(k.split("/")[-3] for k, (_, serving) in others.items() if serving)
        if busy:
            self._become("waiting", None, f"{', '.join(busy)} still serving")
        elif await self._claim(epoch, others):
            if self._settle() and not self._serving:  # still ours after the round trip
                self._become("active", epoch, f"claimed epoch {epoch}")
        else:  # a view lagged behind etcd: try again once it caught up
            self._become("waiting", None, "claim refused by etcd")
            asyncio.get_running_loop().call_later(0.1, self.poke)

    def _become(self, state: str, epoch: int | None, why: str) -> None:
        """``epoch`` is set only when serving (state ``active``)."""
        serving = state == "active"
        if (state, serving, epoch, why) == (self.state, self._serving, self.epoch, self.reason):
            return
        self.state, self._serving, self.epoch, self.reason = state, serving, epoch, why
        self.log.bind(epoch=epoch)
        self.log.info("role", state=state, reason=why)
        self._on_change()

    # -- etcd writes ------------------------------------------------------------------
    def _encode(self, serving: bool, epoch: int | None) -> tuple[bytes, bytes]:
        """The report, and its significant part (what makes it worth writing now)."""
        resources, plcs = self._parts()
        role = "active" if serving else self.state
        report = CommReport(
            service=self.service,
            resources=resources,
            node=self.node,
            role=role,
            serving=serving,
            epoch=epoch,
            plcs=plcs,
        )
        significant = repr(
            (
                role,
                serving,
                epoch,
                sorted((k, r.ok) for k, r in resources.items()),
                sorted((k, p.state, p.path) for k, p in plcs.items()),
            )
        ).encode()
        return report.encode(), significant

    async def _claim(self, epoch: int, others: dict[str, tuple[int, bool]]) -> bool:
        lease = self._writing_on = self.session.lease
        if lease is None:
            return False
        value, significant = self._encode(True, epoch)
        result = await self.store.txn(
            [
                Compare.created(self.leader_key, epoch),
                # the peers below are the pair's nodes in this topology
                Compare.modified(keys.TOPOLOGY, self._topology_rev),
            ]
            # every peer's report as seen: absent ones still absent
            + [Compare.modified(k, rev) for k, (rev, _) in others.items()],
            [Op.put(self.report_key, value, lease=lease)],
        )
        if result.succeeded:
            self._written, self._written_at = significant, time.monotonic()
        return result.succeeded

    async def _report(self) -> None:
        lease = self._writing_on = self.session.lease
        if lease is None:
            return
        value, significant = self._encode(self._serving, self.epoch)
        due = time.monotonic() - self._written_at >= self.refresh_s
        if significant == self._written and not due:
            return
        if self._serving:
            assert self.epoch is not None  # set with _serving (see _become)
            result = await self.store.txn(
                [Compare.created(self.leader_key, self.epoch)],
                [Op.put(self.report_key, value, lease=lease)],
            )
            if not result.succeeded:  # the term is over, whatever our view still says
                self._become("standby", None, "the pair's leader moved")
                value, significant = self._encode(False, None)
            else:
                self._written, self._written_at = significant, time.monotonic()
                return
        await self.store.put(self.report_key, value, lease=lease)
        self._written, self._written_at = significant, time.monotonic()

    def _lease_changed(self) -> None:
        """The session granted, confirmed or lost its lease: move the fence timer."""
        lease = self.session.lease
        if lease != self._lease_seen:  # a new lease: the report must be written on it
            self._lease_seen, self._written = lease, b""
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        if self.session.acked_send is not None:
            self._errors.clear()  # all is well again: warn anew next time
            # A timer on the loop's clock fires late after a suspend; every write
            # checks _fresh() on boottime meanwhile.
            due = max(0.0, self.session.fence_deadline - self.clock())
            self._fence = asyncio.get_running_loop().call_later(due, self._fence_due)
        self.poke()

    def _mirror_changed(self, change: object) -> None:
        self._settle()
        self.poke()

    def _fence_due(self) -> None:
        self._settle()
        self.poke()

    def _warn_once(self, what: str, detail: str) -> None:
        if what not in self._errors:
            self._errors.add(what)
            self.log.warning(what, detail=detail)
