"""One registry telling 1,000 clients of each endpoint change: the fan-out alone.

One etcd (TLS, client certificates), one registry process, and 1,000 clients in a
process of their own (bench/hundred_clients.py: half long-poll, half event stream).
Each stream asks, as the client library does, for the followed service's endpoint
answers alone (``?kinds=endpoint&services=svc-s0``): the other pairs' messages and the
followed pair's roles and nodes are never written to it, so the figures are those of
the fan-out of what a client follows.
Each change moves the followed service's pair to its other node as a failover does: a
new leader key (a new epoch), then the endpoint record under it. Measured from just
before the endpoint record is sent to etcd to the last client told (so etcd's commit
is inside the figure), with the registry's CPU time and its wait for a CPU over the
same span: the CPU time per client and change does not depend on what else the
machine does, the wait does. ``--pairs`` more pairs in the site (each with a service
and its endpoint) make the state each new stream starts with as large as a plant's.

``--profile FILE`` records the registry with py-spy over the changes (a flame graph, or
collapsed stacks when FILE ends in ``.txt``).
``--kind poll`` or ``stream`` makes every client long-poll, or stream.
Usage: python -m bench.bench_fanout [--changes 20] [--clients 1000] [--pairs 100] [--kind both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.bench_hundred import played_pair
from bench.bench_registry import start_registry
from bench.procstat import sched_seconds
from hapair.shared import keys
from hapair.shared.records import EndpointRecord, Leader
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port, stop_pid
from tests.support.tls_etcd import own_etcd

ROOT = Path(__file__).resolve().parent.parent
FOLLOWED = "s0"
SERVICE = f"svc-{FOLLOWED}"
TARGET_MS = 200.0


async def publish(c: Cluster, pair: str, node: str, lease: int, first: bool = False) -> int:
    """``node`` active in ``pair`` at a new epoch, its endpoint not yet published."""
    if not first:
        await c.store.delete(keys.leader(pair))
    return await c.store.put(keys.leader(pair), Leader(node=node).encode(), lease=lease)


def endpoint(pair: str, node: str, epoch: int) -> bytes:
    host = {"a": "127.0.9.1", "b": "127.0.9.2"}[node[-1]]
    return EndpointRecord(
        service=f"svc-{pair}",
        pair=pair,
        node=node,
        host=host,
        port=8080,
        protocol="http",
        epoch=epoch,
    ).encode()


def told_of(out: Path, epoch: int) -> list[float] | None:
    if not out.exists():
        return None
    for line in out.read_text().splitlines():
        record = json.loads(line)
        if record["epoch"] == epoch:
            return [float(t) for t, _ in record["told"]]
    return None


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_clients(url: str, clients: int, out: Path, kind: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            *("-m", "bench.hundred_clients", "--registries", url, "--service", SERVICE),
            *("--clients", str(clients), "--out", str(out), "--kind", kind),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def start_profiler(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy, beside this Python: a flame graph, or collapsed stacks for a .txt."""
    return subprocess.Popen(
        [
            *(str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid)),
            *("-o", out, "-r", "200", "-f", "raw" if out.endswith(".txt") else "flamegraph"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def run(args: argparse.Namespace, tmp: Path) -> int:
    etcd = own_etcd(tmp / "etcd-pki")
    c = Cluster(etcd, tmp)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await c.apply(c.site([played_pair(i) for i in range(args.pairs)]))
        lease = await c.store.grant(600)
        for i in range(args.pairs):
            epoch = await publish(c, f"s{i}", f"s{i}-a", lease, first=True)
            await c.store.put(keys.endpoint(f"svc-s{i}"), endpoint(f"s{i}", f"s{i}-a", epoch))
        port = free_port()
        registry = start_registry(etcd, port, tmp / "registry.log")
        procs.append(registry)
        url = f"http://127.0.0.1:{port}"
        await until(lambda: asyncio.to_thread(answers, f"{url}/v1/endpoints/{SERVICE}"), 20, "up")
        out = tmp / "told.jsonl"
        clients = start_clients(url, args.clients, out, args.kind)
        procs.append(clients)
        assert clients.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(clients.stdout.readline), 60)
        if ready.strip() != b"ready":
            print("the clients did not start", file=sys.stderr)
            return 1
        kinds = {"both": "half long-poll, half event stream", "poll": "long-poll"}
        print(f"one registry, {args.clients} clients ({kinds.get(args.kind, 'event stream')})")
        print(f"site: {args.pairs} pairs; {args.changes} changes of {SERVICE}'s endpoint")
        print(f"start: load average {os.getloadavg()[0]:.2f} (1 min), 2 cores shared")
        profiler = None
        if args.profile:
            profiler = start_profiler(registry.pid, args.profile)
            procs.append(profiler)
            await asyncio.sleep(1.0)
        cpu_start = sched_seconds(registry.pid)[0]
        last_ms: list[float] = []
        cpu_us: list[float] = []
        short = 0
        node = f"{FOLLOWED}-a"
        for n in range(args.changes):
            node = f"{FOLLOWED}-{'b' if node.endswith('a') else 'a'}"
            epoch = await publish(c, FOLLOWED, node, lease)
            await asyncio.sleep(0.2)  # the endpoint comes a little after the leader key
            cpu0, wait0 = sched_seconds(registry.pid)
            at = time.monotonic()
            await c.store.put(keys.endpoint(SERVICE), endpoint(FOLLOWED, node, epoch))
            times = await until(
                lambda e=epoch: asyncio.sleep(0, told_of(out, e)), 30, "every client told"
            )
            cpu1, wait1 = sched_seconds(registry.pid)
            if len(times) < args.clients:
                short += 1
            last_ms.append((max(times) - at) * 1000)
            cpu_us.append((cpu1 - cpu0) / len(times) * 1e6)
            print(
                f"  change {n + 1}: {len(times)} told, last {last_ms[-1]:.1f} ms, median "
                f"{(statistics.median(times) - at) * 1000:.1f} ms; registry CPU "
                f"{(cpu1 - cpu0) * 1000:.0f} ms, waited for a CPU {(wait1 - wait0) * 1000:.0f} ms",
                flush=True,
            )
            await asyncio.sleep(args.pause_s)
        cpu_all = sched_seconds(registry.pid)[0] - cpu_start
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        print(f"end: load average {os.getloadavg()[0]:.2f} (1 min), 2 cores shared")
        print()
        q = (
            statistics.quantiles(last_ms, n=10, method="inclusive")
            if len(last_ms) > 1
            else last_ms * 9
        )
        verdict = "ok" if statistics.median(last_ms) <= TARGET_MS else "MISSED"
        print(
            f"endpoint written -> {args.clients}th told: "
            f"median {statistics.median(last_ms):.1f} ms "
            f"(min {min(last_ms):.1f}, p10 {q[0]:.1f}, p90 {q[-1]:.1f}, max {max(last_ms):.1f}) "
            f"over {len(last_ms)} changes; target <= {TARGET_MS:g} ms {verdict}"
            + (f" ({short} changes not told to every client)" if short else "")
        )
        print(
            f"registry CPU per client and change: median {statistics.median(cpu_us):.1f} us "
            f"(min {min(cpu_us):.1f}, max {max(cpu_us):.1f}); over the whole run, with what "
            f"the clients ask between changes: {cpu_all / args.changes * 1000:.1f} ms a change"
        )
        return 0 if verdict == "ok" and not short else 1
    finally:
        for proc in reversed(procs):
            stop_pid(proc)
        await c.stop_all()
        etcd.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument(
        "--kind", choices=["both", "poll", "stream"], default="both", help="of every client"
    )
    parser.add_argument("--pause-s", type=float, default=0.5, help="between two changes")
    parser.add_argument("--profile", help="py-spy of the registry: SVG, or collapsed stacks (.txt)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hapair-fanout-"))
    try:
        code = asyncio.run(run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
