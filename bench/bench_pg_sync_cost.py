"""What synchronous replication costs: pgbench throughput, synchronous vs asynchronous.

A primary and a streaming standby managed by hapair's PostgreSQL layer; pgbench
(scale 10, -c4 -j2) runs from a second process, alternating synchronous and
asynchronous rounds. Target: synchronous at least 85 % of asynchronous (medians).
Usage: python -m bench.bench_pg_sync_cost [--runs 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
from pathlib import Path

from tests.support.pg_harness import PASSWORDS, primary_with_standbys, running_cluster

ROOT = Path(__file__).resolve().parent.parent

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


def pgbench(host: str, port: int, *args: str) -> str:
    env = {**os.environ, "PGPASSWORD": PASSWORDS["superuser"]}
    out = subprocess.run(
        [PGBENCH, "-h", host, "-p", str(port), "-U", "postgres", *args, "mes"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return out.stdout


async def main(runs: int, seconds: int) -> None:
    async with running_cluster(2, synchronous=True) as cluster:
        await primary_with_standbys(cluster)
        host, port = cluster.address("a"), cluster.port
        await asyncio.to_thread(pgbench, host, port, "-i", "-s", "10", "-q")
        tps: dict[str, list[float]] = {"synchronous": [], "asynchronous": []}
        for i in range(runs):
            for mode in ("synchronous", "asynchronous"):
                if mode == "synchronous":
                    await cluster.mgr["a"].restore_sync(["b"])
                else:
                    await cluster.mgr["a"].degrade_to_async()
                out = await asyncio.to_thread(
                    pgbench, host, port, "-c4", "-j2", f"-T{seconds}", "-n"
                )
                match = re.search(r"tps = ([\d.]+)", out)
                assert match is not None, out
                tps[mode].append(float(match.group(1)))
                print(f"  run {i + 1} {mode:<12} {float(match.group(1)):9.0f} tps", flush=True)
    sync, asyn = statistics.median(tps["synchronous"]), statistics.median(tps["asynchronous"])
    print(f"\nsynchronous  median {sync:9.0f} tps")
    print(f"asynchronous median {asyn:9.0f} tps")
    print(f"ratio {sync / asyn:.2f}   target >= 0.85")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.seconds))
