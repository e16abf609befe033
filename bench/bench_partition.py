"""Takeover after a partition of the active from everything, in network namespaces.

etcd, node a and node b each on a host of their own (``tests/support/vip_lab.py``), pair
defaults (lease TTL 2 s). The active's switch port goes down (a pulled cable): it can
reach neither etcd nor its peer. Measured from the cut, on the machine-wide monotonic
clock:
  fenced     the cut-off active stopped its service (the service's own record)
  started    the other node's service process started (its own record)
  published  the other node's endpoint (newer epoch) seen in etcd
Target: started <= TTL + 0.5 s = 2.5 s. The cable goes back in after each run and the
old active rejoins as standby; runs alternate between the nodes. etcd runs over TLS with
client certificates, each agent showing its own, unless ``--lab`` asks for the lab mode.

Usage: python -m bench.bench_partition [--runs 7] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.support.cluster import until
from tests.support.harness import free_port
from tests.support.netns import unavailable
from tests.support.tls_etcd import LAB_HELP, etcd_mode
from tests.support.vip_lab import LabSite, service

ROOT = Path(__file__).resolve().parent.parent

TTL = 2.0


def _runs_since(site: LabSite, t: float) -> list[dict[str, object]]:
    return [r for r in site.cluster.intervals() if float(str(r["start"])) > t]


async def main(runs: int, lab: bool = False) -> int:
    why = unavailable()
    if why is not None:
        print(f"skipped: network namespaces unavailable here ({why})")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-partition-"))
    results: dict[str, list[float]] = {"fenced": [], "started": [], "published": []}
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    try:
        async with LabSite(tmp, ["a", "b"], secure=not lab) as site:
            c = site.cluster
            port = free_port()
            nodes = [site.node_entry("a"), site.node_entry("b")]
            svc = service("part-svc", port, c.record, critical=True)
            await c.apply(c.site([{"name": "p", "nodes": nodes, "services": [svc]}]))
            c.start("a")
            active, epoch = await c.active("p", node="a", timeout=20)
            c.start("b")
            await c.standby("b", timeout=20)
            for _ in range(runs):
                other = "b" if active == "a" else "a"
                cut = time.monotonic()
                site.lab.cut(site[active])

                async def published(e: int = epoch, o: str = other) -> float | None:
                    ep = await c.endpoint("part-svc")
                    return time.monotonic() if ep and ep.epoch > e and ep.node == o else None

                seen = await until(published, 15, f"{other}'s endpoint", step=0.01)
                new = [r for r in _runs_since(site, cut) if r["node"] == other]
                started = float(str(new[0]["start"])) if new else float("nan")
                old = [
                    r for r in c.intervals() if r["node"] == active and float(str(r["start"])) < cut
                ]
                fenced = max(float(str(r["end"])) for r in old) if old else float("nan")
                results["fenced"].append(fenced - cut)
                results["started"].append(started - cut)
                results["published"].append(seen - cut)
                print(
                    f"  {active} cut: fenced {fenced - cut:.3f} s, {other} started "
                    f"{started - cut:.3f} s, published {seen - cut:.3f} s",
                    flush=True,
                )
                site.lab.restore(site[active])
                active, epoch = await c.active("p", not_epoch=epoch, node=other)
                await c.standby("b" if active == "a" else "a", timeout=20)
        checked = site.cluster.assert_no_overlap()  # every run complete: agents stopped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nno overlap across {checked} service runs\n")
    print(f"{'from the cut to':<12} {'runs':>4} {'median':>8} {'min':>7} {'max':>7}")
    for what, values in results.items():
        print(
            f"{what:<12} {len(values):>4} {statistics.median(values):>8.3f} "
            f"{min(values):>7.3f} {max(values):>7.3f}"
        )
    print(f"target: started <= TTL + 0.5 = {TTL + 0.5:.1f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.runs, args.lab)))
