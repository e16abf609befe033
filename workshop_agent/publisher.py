"""The node's status, its own resource report and its active endpoints in etcd, kept in
line with reality: written again whenever the agent marks them dirty, on its lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable

from hapair.shared import drift, keys
from hapair.shared.agent_process import local_pid_ns, own_start_ticks
from hapair.shared.clock import Clock
from hapair.shared.lease import Session
from hapair.shared.log import EventLog
from hapair.shared.records import (
    EndpointRecord,
    NodeStatus,
    PackageStatus,
    ResourceReport,
    Role,
    local_boot_id,
)
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.database import Database
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.netwatch import RESOURCE, NetWatch
from hapair.workshop_agent.supervisor import Supervisor

RETRY_S = 0.1
AGENT_REPORT = "hapair-agent"


class Publisher:
    """``place`` gives this node's pair and node in the topology now; ``term`` the term
    it holds; ``holdoff_until`` until when it holds off after a failure; ``lost`` the
    critical resources the pair lost; ``held_by`` the node it promised not to campaign
    against; ``packages`` what it holds of the services' packages. ``dirty`` is set
    by the agent whenever any of it may have changed."""

    def __init__(
        self,
        store: Store,
        election: Election,
        session: Session,
        supervisor: Supervisor,
        netwatch: NetWatch,
        database: Database | None,
        clock: Clock,
        log: EventLog,
        me: str,
        dirty: asyncio.Event,
        *,
        place: Callable[[], tuple[Pair | None, Node | None]],
        in_topology: Callable[[], bool],
        term: Callable[[], int | None],
        holdoff_until: Callable[[], float],
        lost: Callable[[], Iterable[str]],
        held_by: Callable[[], str | None],
        packages: Callable[[], list[PackageStatus]] = list,
        fence_loop: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.store = store
        self.election = election
        self.session = session
        self.supervisor = supervisor
        self.netwatch = netwatch
        self.database = database
        self.clock = clock
        self.log = log
        self.me = me
        self.dirty = dirty
        self._place = place
        self._in_topology = in_topology
        self._term = term
        self._holdoff_until = holdoff_until
        self._lost = lost
        self._held_by = held_by
        self._packages = packages
        self._fence_loop = fence_loop
        self._published: dict[str, bytes] = {}
        self._last_status: tuple[int, bytes] = (0, b"")
        self._last_report: tuple[int, bytes] = (0, b"")

    async def run(self) -> None:
        """Keep the node status and this node's endpoints in etcd in line with reality."""
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            try:
                await self._publish()
            except StoreError as err:
                self.log.debug("publish failed", error=str(err))
                await asyncio.sleep(RETRY_S)
                self.dirty.set()
            except Exception as err:  # a bug must not stop publishing for good
                self.log.exception("publish failed", err)
                await asyncio.sleep(RETRY_S)
                self.dirty.set()

    async def withdraw_endpoints(self) -> None:
        """Delete the endpoints published for this term (a step-down, services stopped)."""
        for key, value in list(self._published.items()):
            # Best effort: they go with the lease anyway and carry the old epoch. An
            # etcd error here must not stop the step-down half way.
            with contextlib.suppress(StoreError):
                await self.election.delete_if(key, value)
            self._published.pop(key, None)

    async def _publish(self) -> None:
        sup = self.supervisor
        pair, node = self._place()
        if pair is None or node is None:
            return
        lease = self.session.lease
        if lease is None:
            self._published.clear()
            self._last_status = (0, b"")
            return
        healthy, problems = sup.healthy()
        if self.clock() < self._holdoff_until():
            healthy = False
            problems = [*problems, "stepped down after a failure; holding off"]
        if not self._in_topology():
            healthy = False
            problems = [*problems, "not in the applied topology"]
        problems += [f"critical resource {name} lost" for name in sorted(self._lost())]
        if self.netwatch.state is not None:
            problems += self.netwatch.state.problems()
        packages = self._packages()
        problems += drift.problems(pair, packages)
        if (looping := self._fence_loop()) is not None:
            problems = [*problems, looping]
        role: Role = "standby"
        term = self._term()
        if term is not None:
            active_states = [r.state for r in sup.runners.values() if r.active_only]
            role = "active" if all(s in ("running", "held") for s in active_states) else "starting"
            if sup.held:
                problems = [*problems, "awaiting operator: " + ", ".join(sorted(sup.held))]
        status = NodeStatus(
            node=self.me,
            pair=pair.name,
            address=node.address,
            role=role,
            epoch=term,
            healthy=healthy,
            problems=problems,
            services=sup.statuses(),
            packages=packages,
            database=(
                self.database.status.model_dump(mode="json")
                if self.database is not None and self.database.status is not None
                else None
            ),
            pid=os.getpid(),
            boot_id=local_boot_id(),
            pid_ns=local_pid_ns(),
            pid_start=own_start_ticks(),
            held_by=self._held_by(),
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
        pair, _ = self._place()
        if state is None or pair is None or pair.network is None:
            return
        iso = pair.network.isolation_after_s
        report = ResourceReport(
            service=AGENT_REPORT,
            resources={RESOURCE: state.resource(self._term() is not None, iso)},
        )
        raw = report.model_copy(update={"at": 0.0}).encode()
        if (lease, raw) != self._last_report:
            await self.store.put(keys.report(self.me, AGENT_REPORT), report.encode(), lease=lease)
            self._last_report = (lease, raw)

    async def _publish_endpoints(self, pair: Pair, node: Node, lease: int) -> None:
        epoch = self._term()
        wanted: dict[str, bytes] = {}
        if epoch is not None:
            for spec in self.supervisor.running_with_endpoint():
                assert spec.endpoint is not None
                wanted[keys.endpoint(spec.name)] = EndpointRecord(
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
            wanted[keys.endpoint(db.endpoint_name)] = EndpointRecord(
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
