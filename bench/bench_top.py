"""``hapair top``: refresh latency and CPU at idle, on a site of 20 pairs.

A real etcd holds a site of 4 workshops x 5 pairs (two nodes, two services and a
database each, an active per pair, 50 events); one registry process serves it;
``hapair top`` runs as an operator would run it, in a pseudo-terminal of 80x24, in a
process of its own.

  latency  an event is written in etcd; measured until its line reaches the terminal
           (etcd -> registry watch -> event stream -> GET /v1/site -> frame). Target
           <= 200 ms (median).
  idle     the CPU time of the ``hapair top`` process over a quiet period (the site
           unchanged, the dashboard still redrawing its clock every second), from
           /proc/PID/stat, as a share of one core. Target <= 2 %.

etcd runs over TLS with client certificates, the registry showing its own, as on a
plant. Prints median, min and max of each. Usage:
  python -m bench.bench_top [--runs 15] [--idle-s 20] [--idle-runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from hapair.shared import keys, pki, records
from hapair.shared.store import Store
from hapair.shared.topology import parse_site
from tests.support.cluster import until
from tests.support.harness import Etcd, free_port, stop_pid
from tests.support.pty_run import spawn_in_pty
from tests.support.tls_etcd import own_etcd

ROOT = Path(__file__).resolve().parent.parent

WORKSHOPS, PAIRS_PER_WORKSHOP = 4, 5
ROWS, COLS = 24, 80
HAPAIR = str(Path(sys.executable).parent / "hapair")
REGISTRY = [sys.executable, "-m", "hapair.registry.main"]
REGISTRY_USER = "reg-1"  # its etcd user
TARGET_LATENCY_MS, TARGET_CPU_PCT = 200.0, 2.0


def site_doc() -> dict[str, Any]:
    workshops = []
    for w in range(WORKSHOPS):
        pairs = []
        for p in range(PAIRS_PER_WORKSHOP):
            n = w * PAIRS_PER_WORKSHOP + p
            name = f"p{n:02d}"
            pairs.append(
                {
                    "name": name,
                    "nodes": [
                        {"name": f"{name}-a", "address": f"127.1.{n}.1"},
                        {"name": f"{name}-b", "address": f"127.1.{n}.2"},
                    ],
                    "services": [
                        {
                            "name": f"mes-{name}",
                            "command": ["true"],
                            "endpoint": {"port": 8080, "protocol": "http"},
                        },
                        {"name": f"batch-{name}", "command": ["true"]},
                    ],
                }
            )
        workshops.append({"name": f"workshop-{w}", "pairs": pairs})
    return {"site": "bench-plant", "workshops": workshops}


async def seed(store: Store) -> None:
    """The site, as its agents would have written it once all are up and settled."""
    site = parse_site(site_doc(), "bench site")
    await store.put(keys.TOPOLOGY, records.TopologyDoc(site=site.model_dump(mode="json")).encode())
    lease = await store.grant(3600)
    for pair in site.pairs():
        main, other = pair.nodes
        epoch = await store.put(
            keys.leader(pair.name), records.Leader(node=main.name).encode(), lease=lease
        )
        running = [
            records.ServiceStatus(name=s.name, placement="active", state="running", restarts=1)
            for s in pair.services
        ]
        # Each pair's PostgreSQL as well, so that the frames carry the database lines.
        primary = {
            "role": "primary",
            "timeline": 2,
            "replicas": [{"name": other.name, "sync_state": "sync", "state": "streaming"}],
        }
        standby = {
            "role": "standby",
            "timeline": 2,
            "lag_bytes": 0,
            "lag_s": 0.0,
            "streaming": True,
        }
        for node, role, services, db in (
            (main, "active", running, primary),
            (other, "standby", [], standby),
        ):
            status = records.NodeStatus(
                node=node.name,
                pair=pair.name,
                address=node.address,
                role=role,
                epoch=epoch if role == "active" else None,
                services=services,
                database=db,
            )
            await store.put(keys.node_status(node.name), status.encode(), lease=lease)
        service = pair.services[0]
        endpoint = records.EndpointRecord(
            service=service.name,
            pair=pair.name,
            node=main.name,
            host=main.address,
            port=8080,
            protocol="http",
            epoch=epoch,
        )
        await store.put(keys.endpoint(service.name), endpoint.encode(), lease=lease)
        await event(store, "election", f"{main.name} won the first election", pair.name)
    for i in range(30):
        await event(store, "switchover", f"planned switchover {i}", "p00")


async def event(store: Store, kind: str, reason: str, pair: str | None = None) -> None:
    record = records.Event(kind=kind, pair=pair, reason=reason)
    await store.put(keys.event(time.time_ns(), "bench"), record.encode())


class Terminal:
    """``hapair top`` in a pseudo-terminal; what it writes is read as it comes."""

    def __init__(self, registry: str) -> None:
        env = {"HAPAIR_REGISTRY": registry, "PYTHONPATH": str(ROOT)}
        self.proc, self.master = spawn_in_pty([HAPAIR, "top"], env, ROWS, COLS, cwd=ROOT)
        self.tail = b""
        self.waiting: tuple[bytes, asyncio.Future[float]] | None = None
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        now = time.monotonic()
        window = self.tail + data
        self.tail = window[-256:]
        if self.waiting is not None and self.waiting[0] in window:
            seen = self.waiting[1]
            self.waiting = None
            if not seen.done():
                seen.set_result(now)

    async def shows(self, marker: str, limit_s: float = 10.0) -> float:
        """When ``marker`` is next written to the terminal (monotonic clock)."""
        seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting = (marker.encode(), seen)
        return await asyncio.wait_for(seen, limit_s)

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        try:
            os.write(self.master, b"q")
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            stop_pid(self.proc)
        os.close(self.master)


async def measure(registry: str, store: Store, runs: int, idle_s: float, idle_runs: int) -> None:
    term = Terminal(registry)
    latencies: list[float] = []
    cpu: list[float] = []
    try:
        await term.shows("LIVE", 15)
        await asyncio.sleep(2.0)
        for i in range(runs):
            marker = f"zq{i:03d}x"
            seen = asyncio.ensure_future(term.shows(marker))
            await asyncio.sleep(0)
            start = time.monotonic()
            await event(store, "bench", marker)
            latencies.append((await seen - start) * 1000)
            print(f"  latency run {i + 1}: {latencies[-1]:.1f} ms", flush=True)
            await asyncio.sleep(0.5 + random.random())  # not in step with the 1 s redraw
        await asyncio.sleep(3.0)
        for i in range(idle_runs):
            before, t0 = term.cpu_s(), time.monotonic()
            await asyncio.sleep(idle_s)
            share = (term.cpu_s() - before) / (time.monotonic() - t0) * 100
            cpu.append(share)
            print(f"  idle run {i + 1}: {share:.2f} % of one core over {idle_s:g} s", flush=True)
    finally:
        term.close()
    print(
        f"\nrefresh latency (ms)  median {statistics.median(latencies):.1f}  "
        f"min {min(latencies):.1f}  max {max(latencies):.1f}   target <= {TARGET_LATENCY_MS:g}"
    )
    print(
        f"CPU at idle (%)      median {statistics.median(cpu):.2f}  "
        f"min {min(cpu):.2f}  max {max(cpu):.2f}   target <= {TARGET_CPU_PCT:g} "
        f"({WORKSHOPS * PAIRS_PER_WORKSHOP} pairs, {COLS}x{ROWS})"
    )


async def healthy(url: str) -> bool:
    def get() -> bool:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
            return bool(r.status == 200)

    return await asyncio.to_thread(get)


async def bench(args: argparse.Namespace, etcd: Etcd, url: str) -> None:
    store = Store(etcd.url, timeout=2.0, tls=etcd.tls)
    try:
        await seed(store)
        await until(lambda: healthy(url), 15, "the registry in step with etcd")
        await measure(url, store, args.runs, args.idle_s, args.idle_runs)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--idle-runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-top-"))
    etcd = own_etcd(tmp / "pki")
    port = free_port()
    registry = None
    try:
        with (tmp / "registry.log").open("w") as log:
            registry = subprocess.Popen(
                [
                    *REGISTRY,
                    *etcd.client_args(REGISTRY_USER, pki.Kind.REGISTRY),
                    *("--listen", f"127.0.0.1:{port}"),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        asyncio.run(bench(args, etcd, f"http://127.0.0.1:{port}"))
    finally:
        if registry is not None:
            stop_pid(registry)
        etcd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
