"""PostgreSQL failover steps through PgManager, under a steady synchronous write load.

Two real PostgreSQL nodes on 127.0.0.1/.2 (tests/support/pg_harness.py), a writer committing
numbered rows as fast as it can through the libpq multi-host string
(``target_session_attrs=read-write``). Measured from the event to the first commit the
new primary acknowledges, the agent's decision taken as instantaneous (the lease
adds its own time on top):

  crash       SIGKILL to the primary's postmaster -> ensure_primary on the standby
  switchover  switchover_prepare on the primary -> caught_up + ensure_primary on the
              standby (the old primary then rejoins with ensure_standby, no rewind)

Also: the rejoin of the crashed primary (CHECKPOINT + pg_rewind + start) and the
acknowledged rows lost over every run (must be 0). Roles alternate run after run.
Usage: python -m bench.bench_pg_steps [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from tests.support.pg_harness import (
    PgCluster,
    Writer,
    ids_on,
    postgres_available,
    primary_with_standbys,
    running_cluster,
    streaming,
    until,
)

ROOT = Path(__file__).resolve().parent.parent

NOTES = {"crash": 0.050, "switchover": 0.060}  # PostgreSQL alone, measured on the same machine


async def ready_pair(c: PgCluster, primary: str, standby: str) -> None:
    await until(lambda: streaming(c, standby), 30, f"{standby} streaming")
    assert await c.mgr[primary].restore_sync([standby]) == [standby]


async def crash_run(
    c: PgCluster, writer: Writer, old: str, new: str, epoch: int
) -> dict[str, float]:
    await writer.acked_after(time.monotonic(), c.address(old))
    began = time.monotonic()
    c.crash(old)
    result = await c.mgr[new].ensure_primary(epoch)
    assert result.action == "promoted", result
    first = await writer.acked_after(began, c.address(new))
    rejoin_began = time.monotonic()
    rejoin = await c.mgr[old].ensure_standby(c.address(new))
    assert rejoin.action == "rewound", rejoin
    await ready_pair(c, new, old)
    return {
        "first_commit": first - began,
        "ensure_primary": result.took_s,
        "rejoin": time.monotonic() - rejoin_began,
    }


async def switchover_run(
    c: PgCluster, writer: Writer, old: str, new: str, epoch: int
) -> dict[str, float]:
    await writer.acked_after(time.monotonic(), c.address(old))
    began = time.monotonic()
    lsn = await c.mgr[old].switchover_prepare()
    prepared = time.monotonic()
    assert await c.mgr[new].caught_up(lsn, timeout_s=5)
    result = await c.mgr[new].ensure_primary(epoch)
    assert result.action == "promoted", result
    first = await writer.acked_after(began, c.address(new))
    rejoin = await c.mgr[old].ensure_standby(c.address(new))
    assert rejoin.action == "started", rejoin
    await ready_pair(c, new, old)
    return {
        "first_commit": first - began,
        "prepare": prepared - began,
        "ensure_primary": result.took_s,
        "rejoin": rejoin.took_s,
    }


def line(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    spread = f"(min {min(ms):.1f}, max {max(ms):.1f})"
    return f"  {name:<16} median {statistics.median(ms):7.1f} ms  {spread}"


async def main(runs: int) -> int:
    async with running_cluster(2) as c:
        await primary_with_standbys(c)
        writer = Writer(c.multi_host()).start()
        results: dict[str, list[dict[str, float]]] = {"crash": [], "switchover": []}
        primary, standby, epoch = "a", "b", 1
        for kind in ("crash", "switchover"):
            for _ in range(runs):
                epoch += 1
                run = crash_run if kind == "crash" else switchover_run
                results[kind].append(await run(c, writer, primary, standby, epoch))
                primary, standby = standby, primary
        await writer.stop()
        missing = set(writer.acked) - await ids_on(c, primary)

    print(f"PostgreSQL steps, {runs} runs each, synchronous writer ({len(writer.acked)} commits)")
    for kind, rows in results.items():
        print(f"{kind}:")
        for key in rows[0]:
            print(line(key, [r[key] for r in rows]))
        median = statistics.median(r["first_commit"] for r in rows) * 1000
        print(f"  -> event to first commit {median:.0f} ms (notes: ~{NOTES[kind] * 1000:.0f} ms)")
    print(f"acknowledged rows lost: {len(missing)} of {len(writer.acked)}")
    return 1 if missing else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    why = postgres_available()
    if why is not None:
        print(f"skipped: {why}")
        sys.exit(0)
    sys.exit(asyncio.run(main(max(5, args.runs))))
