"""What security costs: failover times with etcd over TLS (client certificates, auth on
with the roles ``hapair etcd-auth apply`` makes) and an authenticated peer path, side by
side with the lab mode (plain etcd, no peer key), in one run on one machine. A third
mode, ``tls``, has the certificates and the peer key without etcd's roles: it tells the
cost of TLS from the cost of etcd's permission checks.

The two modes take turns, round after round, so that a drift of the machine falls on
both alike. Measured as in ``bench_failover``: from the fault to the service answering
on the other node (crash, critical exit, switchover). Target: the secure mode's median
at most 10 % above the lab mode's, for every case. Usage:
  python -m bench.bench_tls [--rounds 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.bench_failover import ADDRESS, measure, pair_spec
from hapair.registry.console import etcd_auth_cmd
from hapair.shared.topology import parse_site
from tests.support.cluster import Cluster
from tests.support.harness import Etcd, free_port
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

MODES = ("lab", "tls", "secure")  # tls: certificates, without etcd's roles
KINDS = ("switchover", "critical", "crash")
TARGET_RATIO = 1.10


async def one_round(mode: str, runs: int) -> tuple[dict[str, list[float]], int]:
    tmp = Path(tempfile.mkdtemp(prefix=f"hapair-bench-tls-{mode}-"))
    network: dict[str, object] = {
        "probe_interval_s": 0.2,
        "isolation_after_s": 1.0,
        "peer_port": free_port(ADDRESS["a"]),
    }
    etcd: Etcd
    if mode != "lab":
        # The cluster issues each agent's certificate and the pair's peer key.
        etcd = TlsEtcd(TestPki.create(tmp / "pki").dir, ADMIN).start()
    else:
        etcd = Etcd().start()
    c = Cluster(etcd, tmp)
    port = free_port()
    site = c.site([pair_spec(port, c.record, network=network)])
    try:  # from here on, etcd is stopped whatever fails
        await c.apply(site)
        if mode == "secure":
            await etcd_auth_cmd.apply(c.store, etcd_auth_cmd.plan(parse_site(site, "bench")))
        c.start("a")
        c.start("b")
        results = await measure(c, port, runs, KINDS)
    finally:
        await c.stop_all()
        etcd.cleanup()
    try:
        checked = c.assert_no_overlap()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results, checked


async def main(rounds: int, runs: int) -> None:
    results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in KINDS} for m in MODES}
    checked = 0
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            print(f"round {r + 1}/{rounds}, {mode} mode", flush=True)
            got, runs_checked = await one_round(mode, runs)
            checked += runs_checked
            for kind, values in got.items():
                results[mode][kind] += values
    print(f"\nno overlap across {checked} service runs\n")
    print(f"{'case':<11} {'runs':>4} {'lab':>8} {'tls':>8} {'secure':>8} {'ratio':>6}  target")
    for kind in KINDS:
        lab, tls, secure = (statistics.median(results[m][kind]) for m in MODES)
        runs_done = min(len(results[m][kind]) for m in MODES)
        print(
            f"{kind:<11} {runs_done:>4} {lab:>8.3f} {tls:>8.3f} {secure:>8.3f}"
            f" {secure / lab:>6.2f}  medians; secure/lab <= {TARGET_RATIO:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="of each case, per round and mode")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.runs))
