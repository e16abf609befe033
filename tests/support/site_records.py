"""A small site, a stand-in that writes to etcd what a node's agent would write, and the
endpoint publications of a service as a watch sees them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from hapair.comm_server.role import CommReport
from hapair.shared import keys, records, topology
from hapair.shared.plcs import PlcHealth
from hapair.shared.records import EndpointRecord, decode
from hapair.shared.store import Store, StoreError
from hapair.shared.txn import Compare, Op

SITE_YAML = """\
site: plant-1
workshops:
  - name: assembly
    pairs:
      - name: asm
        nodes:
          - {name: asm-a, address: 127.0.0.11}
          - {name: asm-b, address: 127.0.0.12}
          - {name: asm-c, address: 127.0.0.13}
        services:
          - name: mes-api
            command: [python3, -m, http.server, "8080", --bind, "{node.address}"]
            endpoint: {port: 8080, protocol: http}
          - name: worker
            command: [sleep, "1000"]
  - name: paint
    pairs:
      - name: pnt
        nodes:
          - {name: pnt-a, address: 127.0.0.21}
          - {name: pnt-b, address: 127.0.0.22}
        services:
          - name: scada
            command: [sleep, "1000"]
            endpoint: {port: 4840, protocol: opc.tcp}
"""

ADDRESSES = {
    "asm-a": "127.0.0.11",
    "asm-b": "127.0.0.12",
    "asm-c": "127.0.0.13",
    "pnt-a": "127.0.0.21",
    "pnt-b": "127.0.0.22",
}


def site() -> topology.Site:
    return topology.loads(SITE_YAML)


async def apply_site(store: Store) -> None:
    doc = records.TopologyDoc(site=site().model_dump(mode="json"))
    await store.put(keys.TOPOLOGY, doc.encode())


class FakeAgent:
    """Status, leader key and endpoints on a lease of its own, as an agent keeps them."""

    def __init__(self, store: Store, node: str, pair: str) -> None:
        self.store = store
        self.node = node
        self.pair = pair
        self.lease = 0
        self.epoch: int | None = None

    async def up(self, healthy: bool = True, role: str = "standby") -> FakeAgent:
        if not self.lease:
            self.lease = await self.store.grant(30)
        status = records.NodeStatus(
            node=self.node,
            pair=self.pair,
            address=ADDRESSES[self.node],
            role=role,  # type: ignore[arg-type]
            epoch=self.epoch,
            healthy=healthy,
            problems=[] if healthy else ["disk full"],
            services=[
                records.ServiceStatus(
                    name="mes-api", placement="active", state="running", restarts=1
                )
            ],
        )
        await self.store.put(keys.node_status(self.node), status.encode(), lease=self.lease)
        return self

    async def become_active(self) -> int:
        key = keys.leader(self.pair)
        result = await self.store.txn(
            [Compare.absent(key)],
            [Op.put(key, records.Leader(node=self.node).encode(), lease=self.lease)],
        )
        assert result.succeeded, f"{self.pair} already has a leader"
        kv = await self.store.get(keys.leader(self.pair))
        assert kv is not None
        self.epoch = kv.create_revision
        await self.up(role="active")
        return self.epoch

    async def publish(self, service: str, port: int, protocol: str = "http") -> None:
        assert self.epoch is not None
        record = records.EndpointRecord(
            service=service,
            pair=self.pair,
            node=self.node,
            host=ADDRESSES[self.node],
            port=port,
            protocol=protocol,
            epoch=self.epoch,
        )
        await self.store.put(keys.endpoint(service), record.encode(), lease=self.lease)

    async def resign(self) -> None:
        await self.store.delete(keys.leader(self.pair))
        self.epoch = None
        await self.up()

    async def crash(self) -> None:
        """Everything bound to the lease goes at once, as when etcd expires it."""
        await self.store.revoke(self.lease)
        self.lease = 0
        self.epoch = None

    async def report_plcs(self, plcs: dict[str, PlcHealth], service: str = "comm") -> None:
        """What this node's comm server reports of its PLCs, as it writes it."""
        report = CommReport(
            service=service,
            node=self.node,
            role="active" if self.epoch is not None else "standby",
            serving=self.epoch is not None,
            epoch=self.epoch,
            plcs=plcs,
        )
        await self.store.put(keys.report(self.node, service), report.encode(), lease=self.lease)


@contextlib.asynccontextmanager
async def publications(store: Store, service: str) -> AsyncIterator[list[tuple[float, int, str]]]:
    """Every new epoch of the service's endpoint record as etcd publishes it: (time
    seen, epoch, node). Seen by a watch, a moment after the publication itself."""
    seen: list[tuple[float, int, str]] = []
    _, revision = await store.get_prefix(keys.endpoint(service))

    async def watch() -> None:
        async for change in store.watch_prefix(keys.endpoint(service), revision + 1):
            if change.deleted:
                continue
            record = decode(EndpointRecord, change.kv.value, change.kv.key)
            if not seen or record.epoch > seen[-1][1]:
                seen.append((time.monotonic(), record.epoch, record.node))

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await task
