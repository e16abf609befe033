"""The etcd traffic of many agents, played by one process: the nodes bench_hundred does
not run for real.

``python -m bench.hundred_load --etcd URLS --ca CA --cert CRT --key KEY --rates RATES
--pairs s0,s1,...`` plays both nodes of each pair (``NAME-a`` active, ``NAME-b``
standby), each as an agent does it, through :class:`hapair.shared.store.Store` and its
own connection to etcd: a lease kept alive, a status written on it, the three copies of
etcd an agent keeps (topology, pairs, nodes: a read, then a watch), and for the active
its leader key and its service's endpoint record on its lease. After that each node
sends every kind of request at the rate ``RATES`` (a JSON file of requests per second by
role and kind, as measured on real agents: bench/etcd_rates.py) gives for its role.
Prints ``ready`` once every node is up, then runs until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from hapair.shared import keys, records
from hapair.shared.mirror import Mirror
from hapair.shared.pki import TlsFiles
from hapair.shared.store import Store, StoreError
from hapair.shared.txn import Compare, Op

TTL_S = 2.0  # the pairs' default lease
T = TypeVar("T")


class Node:
    """One simulated node and what it asks of etcd."""

    def __init__(self, store: Store, pair: str, name: str, address: str, active: bool) -> None:
        self.store, self.pair, self.name = store, pair, name
        self.address, self.active = address, active
        self.lease = 0
        self.epoch: int | None = None
        self.mirrors = [
            Mirror(store, keys.PREFIX + "/topology/"),
            Mirror(store, keys.PAIRS_PREFIX),
            Mirror(store, keys.NODES_PREFIX),
        ]
        self.tasks: list[asyncio.Task[None]] = []
        self.errors = 0

    def status(self) -> bytes:
        return records.NodeStatus(
            node=self.name,
            pair=self.pair,
            address=self.address,
            role="active" if self.active else "standby",
            epoch=self.epoch,
            healthy=True,
            problems=[],
            services=[
                records.ServiceStatus(
                    name=f"svc-{self.pair}",
                    placement="active",
                    state="running" if self.active else "stopped",
                    restarts=0,
                )
            ],
        ).encode()

    async def up(self) -> None:
        """Come up as an agent does, each step retried until etcd answers it."""
        self.lease = await _retried(lambda: self.store.grant(TTL_S))
        self.tasks.append(asyncio.create_task(self._keepalive()))
        for mirror in self.mirrors:
            self.tasks.append(asyncio.create_task(mirror.run()))
        if self.active:
            leader = keys.leader(self.pair)
            claim = Op.put(leader, records.Leader(node=self.name).encode(), lease=self.lease)
            await _retried(lambda: self.store.txn([Compare.absent(leader)], [claim]))
            kv = await _retried(lambda: self.store.get(leader))
            self.epoch = None if kv is None else kv.create_revision
        status = keys.node_status(self.name)
        await _retried(lambda: self.store.put(status, self.status(), lease=self.lease))
        if self.active and self.epoch is not None:
            endpoint = keys.endpoint(f"svc-{self.pair}")
            await _retried(lambda: self.store.put(endpoint, self.endpoint(), lease=self.lease))

    def endpoint(self) -> bytes:
        assert self.epoch is not None
        return records.EndpointRecord(
            service=f"svc-{self.pair}",
            pair=self.pair,
            node=self.name,
            host=self.address,
            port=8080,
            protocol="http",
            epoch=self.epoch,
        ).encode()

    async def _keepalive(self) -> None:
        while True:
            with contextlib.suppress(StoreError):
                await self.store.keepalive(self.lease)
            await asyncio.sleep(TTL_S / 4)

    def requests(self) -> dict[str, Callable[[], Awaitable[object]]]:
        """One request of each kind an agent sends while idle, on this node's keys."""
        leader = keys.leader(self.pair)
        status = keys.node_status(self.name)
        none = status + "/none"  # a key no one writes
        guard = Compare.created(leader, self.epoch or 0) if self.active else Compare.absent(none)
        return {
            "put": lambda: self.store.put(status, self.status(), lease=self.lease),
            "txn": lambda: self.store.txn([guard], []),
            "get": lambda: self.store.get(leader),
            "range": lambda: self.store.get_prefix(keys.reports_prefix(self.name)),
            "delete": lambda: self.store.delete(none),
        }

    def play(self, rates: dict[str, float]) -> None:
        """Send each kind at its rate, from a random phase (the nodes started apart)."""
        for kind, send in self.requests().items():
            rate = rates.get(kind, 0.0)
            if rate > 0:
                self.tasks.append(asyncio.create_task(self._every(1 / rate, send)))

    async def _every(self, period: float, send: Callable[[], Awaitable[object]]) -> None:
        await asyncio.sleep(random.uniform(0, period))
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await send()
            except StoreError:
                self.errors += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _retried(send: Callable[[], Awaitable[T]]) -> T:
    while True:
        try:
            return await send()
        except StoreError:
            await asyncio.sleep(random.uniform(0.5, 1.0))


def address(pair_index: int, node: int) -> str:
    """The simulated nodes' addresses: none of them is ever listened on."""
    n = pair_index * 2 + node
    return f"127.0.{200 + n // 250}.{n % 250 + 1}"


async def main(args: argparse.Namespace, rates: dict[str, dict[str, float]]) -> None:
    tls = TlsFiles(ca=Path(args.ca), cert=Path(args.cert), key=Path(args.key)) if args.ca else None
    nodes: list[Node] = []
    for name in args.pairs.split(","):
        index = int(name.lstrip("s"))
        for side, active in (("a", True), ("b", False)):
            # Each node its own connection. A longer bound than an agent's: on a busy
            # machine this one process plays 90 nodes, and a call it could not read the
            # answer of in time would move every node on to another member, again and again.
            store = Store(args.etcd, timeout=5.0, tls=tls)
            nodes.append(Node(store, name, f"{name}-{side}", address(index, side == "b"), active))
    # Not all at once: a plant's agents do not start in the same instant either.
    for i in range(0, len(nodes), 5):
        await asyncio.gather(*(n.up() for n in nodes[i : i + 5]))
        await asyncio.sleep(0.1)
    for n in nodes:
        for mirror in n.mirrors:
            await mirror.synced.wait()
    for n in nodes:
        n.play(rates["active" if n.active else "standby"])
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for n in nodes:
        for task in n.tasks:
            task.cancel()
    for n in nodes:  # their leases expire: nothing is left to run on them
        await n.store.close()
    print(f"errors {sum(n.errors for n in nodes)}", flush=True)
    os._exit(0)  # gRPC's channels may linger on closing: nothing is left to do


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--ca", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--rates", required=True)
    parser.add_argument("--pairs", required=True)
    args = parser.parse_args()
    asyncio.run(main(args, json.loads(Path(args.rates).read_text())))
