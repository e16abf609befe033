"""Failover times with the default lease (TTL 2 s), against real etcd and processes.

Measured from the fault to the service answering HTTP on the other node:
  crash       the active server dies (agent, watchdog and services frozen then killed)
  agent-kill  the active's agent alone is killed (SIGKILL) and not restarted until the
              other node serves: its watchdog kills the services and revokes its lease
  critical    the critical service on the active exits (SIGKILL)
  switchover  an operator asks for a planned switchover

Prints median, min, max over several runs of each. etcd runs over TLS with client
certificates, each agent showing its own, unless ``--lab`` asks for the lab mode.
``--lease-ttl 1`` measures a pair with a 1 s lease, on an etcd with the raft timing of
``deploy/etcd/etcd.conf.yml`` (etcd's defaults grant no lease under 2 s). ``--term-beat``
measures a pair whose active beats its term (``failover.term_beat`` at 50/150/150 ms,
with the peer path it needs): a crash is then taken over by the stopped beats. Usage:
  python -m bench.bench_failover [--runs 7] [--lab] [--lease-ttl 2] [--term-beat]
                                 [--kinds agent-kill,crash]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hapair.shared import keys
from hapair.shared.records import Switchover
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import free_port, plant_raft_timing
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "crash": (2.2, 2.8),
    "agent-kill": (0.3, None),
    "critical": (0.2, None),
    "switchover": (0.2, None),
}
KINDS = ("switchover", "critical", "agent-kill", "crash")
# A crash waits for the lease: with a 1 s lease, the first step towards the
# sub-second takeover.
SHORT_LEASE_CRASH = (1.4, 2.0)
BEAT_CRASH = (0.5, None)
TERM_BEAT = {"interval_ms": 50, "fence_ms": 150, "margin_ms": 150}
ADDRESS = {"a": "127.0.80.1", "b": "127.0.80.2"}


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.05) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(0.5)
            return s.recv(12).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


async def until_answers(host: str, port: int, limit: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if await asyncio.to_thread(answers, host, port):
            return time.monotonic()
        await asyncio.sleep(0.002)
    raise RuntimeError(f"{host}:{port} did not answer within {limit}s")


async def ready_standby(c: Cluster, node: str, timeout: float = 15.0) -> None:
    async def ok() -> bool:
        st = await c.status(node)
        return st is not None and st.role == "standby" and st.healthy

    await until(ok, timeout, f"{node} healthy standby")


def pair_spec(
    port: int,
    record: Path,
    name: str = "p",
    address: dict[str, str] = ADDRESS,
    service: str = "bench-svc",
    **extra: object,
) -> dict[str, object]:
    """The pair ``name`` of nodes ``address`` running the critical recording service
    ``service`` on ``port``; ``extra``: more of the pair's settings."""
    svc = recording_service(service, port, record, critical=True)
    return {
        "name": name,
        "nodes": [{"name": n, "address": a} for n, a in address.items()],
        "services": [svc],
        **extra,
    }


# Told of each move once the new active holds the role: (kind, old, new, the fault's
# time, the service's first answer's), on the monotonic clock.
Moved = Callable[[str, str, str, float, float], Awaitable[None]]


async def measure(
    c: Cluster,
    port: int,
    runs: int,
    kinds: tuple[str, ...] = ("switchover", "critical", "crash"),
    moved: Moved | None = None,
    pair: str = "p",
    address: dict[str, str] = ADDRESS,
    ready_s: float = 15.0,
    restarted_s: float = 0.0,
) -> dict[str, list[float]]:
    """``runs`` of each of ``kinds`` on the started pair ``pair`` whose nodes are
    ``address``'s (the first of them active): from the fault to the service answering
    on the other node. ``moved`` may measure more of each move (what a client saw)
    before the next one starts; ``ready_s`` bounds the wait for the old active to be a
    ready standby again; ``restarted_s``: how long a started agent may not take over
    (a pair with a peer path: a lease TTL, for promises its earlier run may have given)."""
    results: dict[str, list[float]] = {k: [] for k in kinds}
    first, second = address
    active, _ = await c.active(pair, node=first, timeout=20)
    await ready_standby(c, second, ready_s)
    await asyncio.sleep(restarted_s)
    for kind in kinds:
        for _ in range(runs):
            standby = second if active == first else first
            await until_answers(address[active], port)
            _, epoch = await c.active(pair, node=active)
            if kind == "crash":
                t0 = time.monotonic()
                c.crash(active)
            elif kind == "agent-kill":
                t0 = time.monotonic()
                c.signal(active, signal.SIGKILL)
            elif kind == "critical":
                st = await c.status(active)
                assert st is not None
                pid = st.services[0].pid
                assert pid is not None
                t0 = time.monotonic()
                c.kill_service(pid)
            else:
                t0 = time.monotonic()
                await c.store.put(keys.switchover(pair), Switchover(to=standby).encode())
            t1 = await until_answers(address[standby], port)
            results[kind].append(t1 - t0)
            print(f"  {kind:<10} {active} -> {standby}: {t1 - t0:.3f} s", flush=True)
            await c.active(pair, not_epoch=epoch, node=standby)
            if moved is not None:
                await moved(kind, active, standby, t0, t1)
            if kind in ("crash", "agent-kill"):
                c.agents[active].wait(5)
                c.start(active)
            await ready_standby(c, active, ready_s)
            if kind in ("crash", "agent-kill"):
                # Its status is written once it holds its node's lock, which starts that
                # wait: a crash within it would be taken over only at its end.
                await asyncio.sleep(restarted_s)
            active = standby
    return results


def checked_and_removed(c: Cluster, tmp: Path) -> int:
    """Once every agent has stopped: the service runs checked for overlaps (their count),
    then the run's directory removed, whatever the check found (kept, with the agents'
    logs, when HAPAIR_BENCH_KEEP is set)."""
    try:
        return c.assert_no_overlap()
    finally:
        if os.environ.get("HAPAIR_BENCH_KEEP"):
            print(f"kept: {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def main(
    runs: int,
    lab: bool = False,
    lease_ttl: float = 2.0,
    kinds: tuple[str, ...] = KINDS,
    term_beat: bool = False,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-"))
    short = lease_ttl < 2.0
    etcd = own_etcd(tmp / "pki", lab, plant_raft_timing() if short else ())
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    print(
        f"lease: {lease_ttl:g} s"
        + (" (etcd with the raft timing of deploy/etcd/etcd.conf.yml)" if short else ""),
        flush=True,
    )
    c = Cluster(etcd, tmp)
    port = free_port()
    failover: dict[str, object] = {"lease_ttl_s": lease_ttl}
    extra: dict[str, object] = {}
    if term_beat:
        print(f"term beat: {TERM_BEAT} with the peer path", flush=True)
        failover["term_beat"] = TERM_BEAT
        extra["network"] = {"peer_port": free_port(ADDRESS["a"])}
    await c.apply(c.site([pair_spec(port, c.record, failover=failover, **extra)]))
    try:
        c.start("a")
        c.start("b")
        restarted = lease_ttl if term_beat else 0.0
        results = await measure(c, port, runs, kinds, restarted_s=restarted)
    finally:
        await c.stop_all()
        etcd.cleanup()
    runs_checked = checked_and_removed(c, tmp)
    print(f"\nno overlap across {runs_checked} service runs\n")
    print(f"{'case':<11} {'runs':>4} {'median':>8} {'min':>7} {'max':>7}  target")
    for kind, values in results.items():
        med_target, max_target = TARGETS[kind]
        if kind == "crash" and short:
            med_target, max_target = SHORT_LEASE_CRASH
        if kind == "crash" and term_beat:
            med_target, max_target = BEAT_CRASH
        target = f"median <= {med_target} s" + (f", max <= {max_target} s" if max_target else "")
        print(
            f"{kind:<11} {len(values):>4} {statistics.median(values):>8.3f} "
            f"{min(values):>7.3f} {max(values):>7.3f}  {target}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument(
        "--lease-ttl", type=float, default=2.0, help="the pair's lease_ttl_s (default 2)"
    )
    parser.add_argument(
        "--term-beat", action="store_true", help="the pair beats its term (50/150/150 ms)"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"the faults to measure, comma-separated (default: {','.join(KINDS)})",
    )
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(TARGETS)
    if unknown:
        parser.error(
            f"unknown --kinds {', '.join(sorted(unknown))}: choose from {', '.join(KINDS)}"
        )
    asyncio.run(main(args.runs, args.lab, args.lease_ttl, kinds, args.term_beat))
