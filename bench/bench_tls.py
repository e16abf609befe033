"""What security costs: failover times with etcd over TLS (client certificates, auth on
with the roles ``hapair etcd-auth apply`` makes) and an authenticated peer path, side by
side with the lab mode (plain etcd, no peer key), in one run on one machine. A third
mode, ``tls``, has the certificates and the peer key without etcd's roles: it tells the
cost of TLS from the cost of etcd's permission checks.

The two modes take turns, round after round, so that a drift of the machine falls on
both alike. Measured as in ``bench_failover``: from the fault to the service answering
on the other node (crash, critical exit, switchover); and as in ``bench_client``'s
outage: a client process that finds the service through a real registry (itself an etcd
client with its own certificate) sends a request every ~2 ms, and its outage is from
its last answer from the old node to its first from the new one. Target: the secure
mode's median at most 10 % above the lab mode's, for every case.

Before the pair starts, each round also times single etcd round trips from one client
(put, get, a transaction, a lease keep-alive), which tells what TLS and the permission
checks add to each of the few round trips a move is made of. Usage:
  python -m bench.bench_tls [--rounds 3] [--runs 3] [--trips 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.bench_client import ClientLog, registry_ready, start_client, start_registry
from bench.bench_failover import ADDRESS, checked_and_removed, measure, pair_spec
from hapair.registry.console import etcd_auth_cmd
from hapair.shared import keys, pki
from hapair.shared.store import Store
from hapair.shared.topology import parse_site
from hapair.shared.txn import Compare, Op
from tests.support.cluster import Cluster
from tests.support.harness import Etcd, free_port, stop_pid
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

MODES = ("lab", "tls", "secure")  # tls: certificates, without etcd's roles
KINDS = ("switchover", "critical", "crash")
CASES = (*KINDS, *(f"{k} client" for k in KINDS))
TRIPS = ("put", "get", "txn", "keepalive")
TARGET_RATIO = 1.10
REGISTRY = "bench-registry"
SERVICE = "bench-svc"  # pair_spec's service


async def round_trips(store: Store, trips: int) -> dict[str, list[float]]:
    """``trips`` of each single etcd round trip, one after the other, in seconds."""
    key = f"{keys.PREFIX}/bench/round-trip"
    lease = await store.grant(10)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: store.put(key, b"x"),
        "get": lambda: store.get(key),
        # As an agent's guarded write: a compare on a key it holds, then a put.
        "txn": lambda: store.txn([Compare.value(key, b"x")], [Op.put(key, b"x")]),
        "keepalive": lambda: store.keepalive(lease),
    }
    times: dict[str, list[float]] = {name: [] for name in TRIPS}
    for _ in range(trips):
        for name in TRIPS:
            t0 = time.perf_counter()
            await calls[name]()
            times[name].append(time.perf_counter() - t0)
    await store.revoke(lease)
    await store.delete(key)
    return times


async def one_round(mode: str, runs: int, trips: int) -> tuple[dict[str, list[float]], int]:
    tmp = Path(tempfile.mkdtemp(prefix=f"hapair-bench-tls-{mode}-"))
    network: dict[str, object] = {
        "probe_interval_s": 0.2,
        "isolation_after_s": 1.0,
        "peer_port": free_port(ADDRESS["a"]),
    }
    etcd: Etcd
    registry_env: dict[str, str] = {}
    if mode != "lab":
        # The cluster issues each agent's certificate and the pair's peer key.
        tls_etcd = TlsEtcd(TestPki.create(tmp / "pki").dir, ADMIN).start()
        registry_env = tls_etcd.client_env(REGISTRY, pki.Kind.REGISTRY)
        etcd = tls_etcd
    else:
        etcd = Etcd().start()
    c = Cluster(etcd, tmp)
    port = free_port()
    site = c.site([pair_spec(port, c.record, network=network)])
    registry = client = None
    out = tmp / "client.jsonl"
    log = ClientLog(out)
    results: dict[str, list[float]] = {}

    async def moved(kind: str, old: str, new: str, t0: float) -> None:
        await log.wait_served(new, t0, 1)
        gap = log.outage(old, new, t0)
        results.setdefault(f"{kind} client", []).append(gap)
        print(f"  {kind:<10} client outage {gap:.3f} s", flush=True)

    try:  # from here on, etcd is stopped whatever fails
        await c.apply(site)
        if mode == "secure":
            plan = etcd_auth_cmd.plan(parse_site(site, "bench"), registries=[REGISTRY])
            await etcd_auth_cmd.apply(c.store, plan)
        results.update(await round_trips(c.store, trips))
        registry, url = start_registry(etcd.url, tmp / "registry.log", registry_env)
        c.start("a")
        c.start("b")
        await c.active("p", node="a", timeout=20)
        await registry_ready(url)
        client = start_client(url, SERVICE, out)
        await log.wait_served("a", 0)
        results.update(await measure(c, port, runs, KINDS, moved))
    finally:
        if client is not None:
            stop_pid(client)
        if registry is not None:
            stop_pid(registry)
        await c.stop_all()
        etcd.cleanup()
    return results, checked_and_removed(c, tmp)


def table(
    title: str,
    results: dict[str, dict[str, list[float]]],
    names: tuple[str, ...],
    unit: str,
    scale: float,
    target: bool,
) -> None:
    print(f"\n{title}")
    print(f"{'case':<18} {'runs':>5} {'lab':>8} {'tls':>8} {'secure':>8} {'ratio':>6}")
    for name in names:
        lab, tls, secure = (statistics.median(results[m][name]) * scale for m in MODES)
        done = min(len(results[m][name]) for m in MODES)
        verdict = ""
        if target:
            ok = secure / lab <= TARGET_RATIO
            verdict = f"  secure/lab <= {TARGET_RATIO:.2f}: {'ok' if ok else 'MISSED'}"
        print(
            f"{name:<18} {done:>5} {lab:>8.3f} {tls:>8.3f} {secure:>8.3f}"
            f" {secure / lab:>6.2f}{verdict}"
        )
    print(f"(medians, {unit})")


async def main(rounds: int, runs: int, trips: int) -> None:
    names = (*CASES, *TRIPS)
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in names} for m in MODES}
    checked = 0
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            print(f"round {r + 1}/{rounds}, {mode} mode", flush=True)
            got, runs_checked = await one_round(mode, runs, trips)
            checked += runs_checked
            for name, values in got.items():
                results[mode][name] += values
    print(f"\nno overlap across {checked} service runs")
    table(
        "fault -> service answering on the other node; client outage",
        results,
        CASES,
        "s",
        1.0,
        True,
    )
    table("single etcd round trips from one client", results, TRIPS, "ms", 1000.0, False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="of each case, per round and mode")
    parser.add_argument("--trips", type=int, default=200, help="of each round trip, per round")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.runs, args.trips))
