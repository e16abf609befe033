"""A rollout of a pair (``hapair rollout``), against real etcd, agents and a registry.

  interruption  what a client that sends a request every ~2 ms (test_client_e2e.py's,
                through a registry) sees of a rollout: from the old active's last answer
                to the new active's first. Median over ``--runs`` rollouts of a small
                package, then over as many planned switchovers alone of the same pair,
                under the same load. Target: median <= 0.25 s, as a planned switchover.
  size          one rollout of a ``--mb`` MB package (incompressible) on 2 nodes,
                downloaded over HTTP from a file server started here: the time from the
                site naming it to every node holding it, the rollout's own time, and the
                total; each agent's CPU while it downloaded, hashed and unpacked it.
  margin        the fence margin left, from the agents' own log: at each confirmed
                keepalive, how far the fence point still was (``lease confirmed
                left=``). Idle, about fence_after - keepalive interval (1.0 s with the
                pair's defaults); 0 would mean a fence. The minimum while downloading
                and over the whole run.

etcd runs over TLS with client certificates, each agent showing its own, unless
``--lab`` asks for the lab mode. Usage:
  python -m bench.bench_rollout [--runs 5] [--mb 50] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.procstat import proc_cpu_seconds
from hapair.shared import admin, rollout
from tests.integration.test_client_e2e import ClientLog, outages
from tests.support.client_lab import RegistryProcess
from tests.support.cluster import PYTHON, Cluster, until
from tests.support.harness import ROOT, free_port
from tests.support.package_lab import build_server, package, served, serving
from tests.support.tls_etcd import LAB_HELP, etcd_mode, own_etcd

TARGET_S = 0.25
ADDRESS = {"a": "127.0.82.1", "b": "127.0.82.2"}
CONFIRMED = re.compile(r'event="lease confirmed".* left=(-?[0-9.]+)')
TS = re.compile(r"ts=(\S+)")


class Bench:
    """A pair of two agents whose ``web`` (active, the client's) and ``warm`` (every
    node) come from one package, served from ``files`` at ``url``."""

    def __init__(self, c: Cluster, files: Path, url: str) -> None:
        self.c, self.files, self.url = c, files, url
        self.web, self.warm = free_port(), free_port()

    def build(self, version: str, data: bytes | None = None) -> Path:
        files: dict[str, str | bytes] = {"data": data} if data else {}
        return build_server(self.files, "app", version, files=files)

    async def apply(self, archive: Path, version: str) -> str:
        pkg = package(archive, f"{self.url}/{archive.name}", version)
        web = served(
            "web", self.web, pkg, self.c.record, endpoint={"port": self.web, "protocol": "http"}
        )
        warm = served("warm", self.warm, pkg, self.c.tmp / "record-warm", placement="all")
        nodes = [{"name": n, "address": a} for n, a in ADDRESS.items()]
        await self.c.apply(self.c.site([{"name": "p", "nodes": nodes, "services": [web, warm]}]))
        return f"{version}-{pkg['sha256'][:12]}"

    async def installed(self, version: str) -> None:
        async def everywhere() -> bool:
            for node in ADDRESS:
                st = await self.c.status(node)
                if st is None or any(version not in p.installed for p in st.packages):
                    return False
            return True

        await until(everywhere, 600, f"{version} on every node", step=0.1)

    async def roll_out(self) -> rollout.Outcome:
        plan = await rollout.prepare(self.c.store, "p")
        started = await rollout.begin(self.c.store, plan, "bench")
        return await started.run(lambda line: print(f"    {line}", flush=True), 600)


async def seen(c: Cluster, log: ClientLog, since: float, label: str) -> list[float]:
    """The client's interruptions since ``since``, once it is served by the active;
    printed after ``label``."""
    active, _ = await c.active("p", timeout=30)
    await until(lambda: log.served_by(active, since, 3), 30, f"the client served by {active}")
    moved = outages([r for r in log.read() if r["done"] >= since])
    shown = ", ".join(f"{g:.3f} s" for g in moved) or "none seen"
    print(f"  {label} client interruption {shown}", flush=True)
    return moved


def margins(c: Cluster, node: str, between: tuple[float, float] | None = None) -> list[float]:
    """What was left of the fence margin at each confirmed keepalive of ``node``
    (between two wall-clock times, if given)."""
    out = []
    for line in c.log(node).splitlines():
        found = CONFIRMED.search(line)
        if found is None:
            continue
        if between is not None:
            stamp = TS.search(line)
            assert stamp is not None
            at = time.mktime(time.strptime(stamp.group(1)[:19], "%Y-%m-%dT%H:%M:%S"))
            at += float("0" + stamp.group(1)[19:])
            if not between[0] <= at <= between[1]:
                continue
        out.append(float(found.group(1)))
    return out


async def main(runs: int, mb: int, lab: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-rollout-"))
    etcd = own_etcd(tmp / "pki", lab)
    print(f"etcd: {etcd_mode(lab)}", flush=True)
    c = Cluster(etcd, tmp)
    registry = None
    client = None
    gaps: list[float] = []
    plain: list[float] = []
    size: dict[str, float] = {}
    try:
        files = tmp / "files"
        files.mkdir()
        async with serving(files) as server:
            b = Bench(c, files, server.url)
            v = await b.apply(b.build("1"), "1")
            for node in ADDRESS:
                c.start(node, "--log-level", "debug")
            await c.active("p", node="a", timeout=30)
            await c.standby("b", timeout=30)
            registry = await RegistryProcess(etcd).start()
            out = tmp / "client.jsonl"
            log = ClientLog(out)
            client = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "tests.integration.test_client_e2e",
                *("--registry", registry.url, "--service", "web", "--out", str(out)),
                cwd=ROOT,
                stderr=(tmp / "client.log").open("wb"),
            )
            await until(lambda: log.served_by("a", 0), 30, "the client served")
            print("interruption (small package):", flush=True)
            for run in range(runs):
                v = await b.apply(b.build(str(run + 2)), str(run + 2))
                await b.installed(v)
                t0 = time.monotonic()
                done = await b.roll_out()
                assert done.ok, done.message
                took = time.monotonic() - t0
                gaps += await seen(c, log, t0, f"run {run + 1}: rollout {took:.2f} s,")
            print("a planned switchover alone, the same pair, for comparison:", flush=True)
            for run in range(runs):
                active, epoch = await c.active("p", timeout=30)
                standby = next(n for n in ADDRESS if n != active)
                await c.standby(standby, timeout=30)
                t0 = time.monotonic()
                await admin.request_switchover(c.store, "p", standby, "bench")
                await c.active("p", not_epoch=epoch, node=standby, timeout=30)
                plain += await seen(c, log, t0, f"run {run + 1}:")
            print(f"size ({mb} MB package):", flush=True)
            big = b.build(str(runs + 2), os.urandom(mb << 20))
            agents = {n: c.agents[n].pid for n in ADDRESS}
            cpu0 = {n: proc_cpu_seconds(pid) for n, pid in agents.items()}
            wall0, t0 = time.time(), time.monotonic()
            v = await b.apply(big, str(runs + 2))
            await b.installed(v)
            t1, wall1 = time.monotonic(), time.time()
            cpu1 = {n: proc_cpu_seconds(pid) for n, pid in agents.items()}
            done = await b.roll_out()
            assert done.ok, done.message
            t2 = time.monotonic()
            size = {
                "install": t1 - t0,
                "rollout": t2 - t1,
                "total": t2 - t0,
                **{f"cpu {n}": (cpu1[n] - cpu0[n]) / (t1 - t0) for n in ADDRESS},
                "margin while downloading": min(
                    m for n in ADDRESS for m in margins(c, n, (wall0, wall1))
                ),
            }
        errors = [r for r in log.read() if "error" in r]
        print(f"client: {len(log.read())} requests, {len(errors)} failed", flush=True)
    finally:
        if client is not None and client.returncode is None:
            client.terminate()
            await client.wait()
        if registry is not None:
            await registry.stop()
        await c.stop_all()
        etcd.cleanup()
    worst = min(m for n in ADDRESS for m in margins(c, n))
    try:
        checked = c.assert_no_overlap()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nno overlap across {checked} runs of the active service\n")
    for label, values in (("rollout", gaps), ("switchover", plain)):
        if values:
            print(
                f"interruption  {label:<10} {len(values)} runs: median "
                f"{statistics.median(values):.3f} s, min {min(values):.3f}, "
                f"max {max(values):.3f}  target: median <= {TARGET_S} s"
            )
    if size:
        print(
            f"size          {mb} MB on 2 nodes: installed everywhere {size['install']:.1f} s, "
            f"rollout {size['rollout']:.1f} s, total {size['total']:.1f} s"
        )
        print(
            f"agent CPU     while installing: a {size['cpu a']:.0%}, b {size['cpu b']:.0%} "
            "of one core"
        )
        print(
            f"fence margin  left at the worst keepalive: {size['margin while downloading']:.3f} s "
            f"while installing, {worst:.3f} s over the whole run (0 would be a fence)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.mb, args.lab))
