"""Database failover through the agents, under a steady synchronous write load.

Real etcd, real agents, real PostgreSQL 15 (two nodes, synchronous replication):
  crash       the active node dies (agent, watchdog and PostgreSQL frozen, then killed)
              -> first commit acknowledged by the new primary
  switchover  a planned switchover -> first commit acknowledged by the new primary
and the acknowledged commits lost (must be 0). Medians over several runs.
etcd runs over TLS with client certificates and the database with TLS (each node's
certificate; replication and the agents' connections with ``sslmode=verify-full``)
unless ``--lab`` asks for the lab mode of both; ``--db-plain`` keeps etcd secure and
runs only the database in clear (``security: none``), to tell the database's TLS cost.
Usage: python -m bench.bench_db_failover [--runs 5] [--lab | --db-plain]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from hapair.shared import keys
from hapair.shared.records import Switchover, SyncState, decode
from tests.support.cluster import Cluster, until
from tests.support.pg_harness import (
    PASSWORDS,
    Writer,
    common_free_port,
    database_section,
    write_secrets,
)
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

ROOT = Path(__file__).resolve().parent.parent

ADDRESS = {"a": "127.0.0.1", "b": "127.0.0.2"}


async def synced(c: Cluster, primary: str, standby: str) -> None:
    async def ok() -> bool:
        kv = await c.store.get(keys.sync_standby("p"))
        st = decode(SyncState, kv.value, kv.key) if kv else None
        return st is not None and st.primary == primary and st.sync == [standby]

    await until(ok, 90, f"{standby} synchronous standby of {primary}")


async def main(runs: int, lab: bool = False, db_plain: bool = False) -> None:
    root = Path(tempfile.mkdtemp(prefix="hapair-benchdb-"))
    os.chmod(root, 0o755)
    write_secrets(root)
    port = common_free_port(tuple(ADDRESS.values()))
    etcd = own_etcd(root / "pki", lab)
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    c = Cluster(etcd, root)
    nodes = [{"name": n, "address": a} for n, a in ADDRESS.items()]
    database = database_section(root, port, synchronous=True)
    if db_plain:
        database["security"] = "none"
    # Otherwise the cluster gives the database its certificates when etcd has a PKI.
    db_tls = not (lab or db_plain)
    print(f"database over TLS: {'yes (verify-full)' if db_tls else 'no (security: none)'}")
    await c.apply(c.site([{"name": "p", "nodes": nodes, "database": database}]))
    conninfo = (
        f"host={','.join(ADDRESS.values())} port={port} dbname=mes user=mes "
        f"password={PASSWORDS['mes']} target_session_attrs=read-write connect_timeout=2"
    )
    results: dict[str, list[float]] = {"crash": [], "switchover": []}
    lost_total = 0
    acked_total = 0
    try:
        c.start("a")
        await c.active("p", node="a", timeout=90)
        c.start("b")
        await synced(c, "a", "b")
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
        active, first_id = "a", 1
        for kind in ("switchover", "crash"):
            for _ in range(runs):
                standby = "b" if active == "a" else "a"
                writer = Writer(conninfo, first_id).start()
                await until(lambda w=writer: _acked(w, 200), 30, "steady writes")
                _, epoch = await c.active("p", node=active)
                t0 = time.monotonic()
                if kind == "crash":
                    c.crash(active)
                else:
                    await c.store.put(keys.switchover("p"), Switchover(to=standby).encode())
                t1 = await writer.acked_after(t0, ADDRESS[standby], timeout=30)
                results[kind].append(t1 - t0)
                await c.active("p", not_epoch=epoch, node=standby, timeout=30)
                await writer.stop()
                first_id = writer.next_id
                async with await psycopg.AsyncConnection.connect(
                    f"host={ADDRESS[standby]} port={port} dbname=mes user=mes "
                    f"password={PASSWORDS['mes']}"
                ) as conn:
                    cur = await conn.execute("SELECT id FROM ticks")
                    present = {int(r[0]) for r in await cur.fetchall()}
                lost = len(set(writer.acked) - present)
                lost_total += lost
                acked_total += len(writer.acked)
                print(
                    f"  {kind:<10} {active} -> {standby}: {t1 - t0:.3f} s, "
                    f"{len(writer.acked)} acknowledged, {lost} lost",
                    flush=True,
                )
                if kind == "crash":
                    c.start(active)
                await synced(c, standby, active)
                active = standby
    finally:
        await c.stop_all()
        etcd.cleanup()
        if not os.environ.get("HAPAIR_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'event':<11} {'runs':>4} {'median':>8} {'min':>7} {'max':>7}  target (median)")
    targets = {"crash": "<= 2.5 s", "switchover": "<= 0.3 s"}
    for kind, values in results.items():
        print(
            f"{kind:<11} {len(values):>4} {statistics.median(values):>8.3f} "
            f"{min(values):>7.3f} {max(values):>7.3f}  {targets[kind]}"
        )
    print(f"acknowledged commits lost: {lost_total} of {acked_total}")


async def _acked(writer: Writer, n: int) -> bool:
    return len(writer.acked) >= n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    parser.add_argument(
        "--db-plain", action="store_true", help="etcd secure, the database in clear"
    )
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.lab, args.db_plain))
