"""hapair beside keepalived, in one lab and in the same run.

One lab of network namespaces on one switch (``tests/support/vip_lab.py``): etcd, hapair's
nodes a and b (a pair with ``vip:`` 10.99.0.100 and a peer path, lease TTL 2 s),
keepalived's nodes ka and kb (Debian's keepalived, VRRP, virtual address 10.99.0.101,
``tests/support/keepalived_lab.py``) and one client host. Both pairs share the topology,
the client and the way faults are made (at the switch), so the figures differ by what
each does only. The phases run one after the other: hapair's agents idle during
keepalived's, keepalived stopped during hapair's. Each node serves the test service
(``tests/support/svc.py``), which answers HTTP with its node's name.

  crash  the active's server crashes: hapair as bench_failover's crash (agent, watchdog
         and services frozen, then killed), keepalived's MASTER the same way (every
         process of the host frozen, then killed), and the host's cable pulled, as a
         dead server looks on the wire. Measured from the crash to the first HTTP answer
         from the other node through the virtual address, seen from the client host (a
         new connection every 10 ms: ``tests/support/answer_probe.py``). keepalived runs
         at ``advert_int 0.1`` with VRRPv3, then at its defaults (``advert_int 1``,
         VRRPv2) for reference. The crashed server comes back without the address, as
         after a reboot, and stays backup: runs alternate between the nodes.
  cut    the link between the two nodes cut (every packet from one to the other
         dropped at the switch, keepalived's multicast VRRP adverts too) while both
         still reach etcd and the client: where the address is, read on both nodes in
         turn (``ip addr``) for ``--cut-s`` seconds, then which MACs answer the client's
         ARP requests for it, the link still cut. keepalived gives two owners; hapair must not: the
         address follows the term, which etcd grants to one node.

etcd runs over TLS with client certificates and each pair gets a peer key, unless
``--lab`` asks for the lab mode.

Usage: python -m bench.bench_keepalived [--runs 7] [--cut-s 5] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import until
from tests.support.harness import PYTHON, ROOT, free_port
from tests.support.keepalived_lab import (
    DEFAULTS,
    FASTEST,
    KeepalivedPair,
    Vrrp,
    cut_between,
    drop_address,
    heal_between,
    missing,
)
from tests.support.netns import IFNAME, Host, Lab, unavailable
from tests.support.tls_etcd import LAB_HELP, etcd_mode
from tests.support.vip_lab import LabSite, VipWatch, mac, service, until_has

HAPAIR_IP = "10.99.0.100"
KEEPALIVED_IP = "10.99.0.101"
PREFIX = "/24"
HAPAIR = "hapair (lease TTL 2 s)"
PROBE_LIMIT_S = 15.0
NETWORK = {"probe_interval_s": 0.2, "isolation_after_s": 1.0, "peer_port": 7400}


def other(name: str, names: tuple[str, str]) -> str:
    return names[1] if name == names[0] else names[0]


async def takeover(
    lab: Lab, client: Host, ip: str, port: int, old: str, new: str, crash: Callable[[], None]
) -> float:
    """Crash ``old`` once the client is answered by it through ``ip``; seconds from the
    crash to ``new``'s first answer there."""
    probe = lab.spawn(
        client, PYTHON, "-m", "tests.support.answer_probe", ip, str(port), new,
        str(PROBE_LIMIT_S), stdout=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert probe.stdout is not None
    out = probe.stdout
    try:
        seen = (await asyncio.wait_for(asyncio.to_thread(out.readline), 15)).decode().split()
        if seen != ["seen", old]:
            raise RuntimeError(f"the client saw {seen} through {ip}, not {old}")
        crashed = time.monotonic()
        crash()
        line = await asyncio.wait_for(asyncio.to_thread(out.readline), PROBE_LIMIT_S + 5)
        word, *rest = line.decode().split() or ["nothing"]
        if word != "answered":
            raise RuntimeError(f"{new} did not answer through {ip} within {PROBE_LIMIT_S} s")
        return float(rest[0]) - crashed
    finally:
        probe.kill()
        probe.wait(5)


# ---- hapair ---------------------------------------------------------------------------


async def start_hapair(site: LabSite) -> int:
    c = site.cluster
    port = free_port()
    pair = {
        "name": "p",
        "nodes": [site.node_entry("a"), site.node_entry("b")],
        "services": [service("p-svc", port, c.record, critical=True)],
        "vip": {"address": HAPAIR_IP + PREFIX, "interface": IFNAME},
        "network": {**NETWORK, "probe_targets": [site["client"].address]},
    }
    await c.apply(c.site([pair]))
    c.start("a")
    await c.active("p", node="a", timeout=20)
    c.start("b")
    await c.standby("b", timeout=20)
    await until_has(site["a"], HAPAIR_IP + PREFIX)
    return port


async def hapair_crashes(site: LabSite, port: int, runs: int) -> list[float]:
    c, lab, vip = site.cluster, site.lab, HAPAIR_IP + PREFIX
    active, epoch = await c.active("p", timeout=20)
    times = []
    for _ in range(runs):
        standby = other(active, ("a", "b"))
        host = site[active]

        def crash(node: str = active, host: Host = host) -> None:
            c.crash(node)
            lab.cut(host)

        took = await takeover(lab, site["client"], HAPAIR_IP, port, active, standby, crash)
        times.append(took)
        print(f"  hapair crash {active} -> {standby}: {took:.3f} s", flush=True)
        _, epoch = await c.active("p", not_epoch=epoch, node=standby, timeout=20)
        drop_address(host, vip)  # a rebooted server starts without it
        lab.restore(host)
        c.start(active)
        await c.standby(active, timeout=20)
        active = standby
    return times


# ---- keepalived -----------------------------------------------------------------------


async def keepalived_crashes(site: LabSite, pair: KeepalivedPair, runs: int) -> list[float]:
    master = await pair.started()
    times = []
    for _ in range(runs):
        backup = next(h for h in pair.hosts if h != master)

        def crash(host: Host = master) -> None:
            pair.crash(host)

        took = await takeover(
            site.lab, site["client"], KEEPALIVED_IP, pair.port, master.name, backup.name, crash
        )
        times.append(took)
        print(f"  {pair.vrrp} crash {master.name} -> {backup.name}: {took:.3f} s", flush=True)
        await pair.reboot(master)
        master = backup
    return times


# ---- the link between the two nodes cut -----------------------------------------------


@dataclass
class Owners:
    """Where the address was while the link between the two nodes was cut."""

    readings: int  # readings of either node after the cut
    both: int  # of which: the latest reading of each node had the address
    first_both_s: float | None  # from the cut to the first such reading
    proven: int  # readings of one node holding it between two of the other holding it
    holders: list[str]  # the nodes seen holding it after the cut
    arp: list[str]  # the nodes whose MAC answered the client's ARP requests for it

    def line(self, name: str) -> str:
        share = f"{100 * self.both / self.readings:.0f} %" if self.readings else "-"
        first = "never" if self.first_both_s is None else f"{self.first_both_s:.2f} s"
        return (
            f"{name:<34} {self.readings:>8} {first:>15} {share:>11} {self.proven:>7}  "
            f"{','.join(self.holders) or '-':<7} {','.join(self.arp) or '-'}"
        )


def arp_replies(client: Host, ip: str, hosts: list[Host]) -> list[str]:
    """The hosts whose MAC answers the client's ARP requests for ``ip`` (two requests,
    or fewer once two replies came)."""
    out = client.run("arping", "-c", "2", "-w", "3", "-I", IFNAME, ip, timeout=10, check=False)
    macs = {m.lower() for m in re.findall(r"\[([0-9A-Fa-f:]{17})\]", out.stdout)}
    return [h.name for h in hosts if mac(h).lower() in macs]


def owners(watch: VipWatch, cut_at: float, arp: list[str]) -> Owners:
    latest: dict[str, bool] = {}
    readings = both = 0
    first: float | None = None
    for name, on, when in watch.samples:
        latest[name] = on
        if when < cut_at:
            continue
        readings += 1
        if len(latest) == 2 and all(latest.values()):
            both += 1
            first = when - cut_at if first is None else first
    proven = sum(1 for _, end in watch.overlaps if end >= cut_at)
    held = sorted({name for name, on, when in watch.samples if on and when >= cut_at})
    return Owners(readings, both, first, proven, held, arp)


async def during_cut(
    site: LabSite,
    pair: tuple[Host, Host],
    cidr: str,
    cut: Callable[[], None],
    seconds: float,
) -> Owners:
    """Read where ``cidr`` is on both nodes of ``pair`` from just before ``cut`` until
    ``seconds`` after it, then ask the client's ARP for it, the link still cut."""
    ip = cidr.split("/")[0]
    async with VipWatch(*pair, cidr) as watch:
        cut_at = time.monotonic()
        cut()
        await asyncio.sleep(seconds)  # the readings over this window are the measurement
        arp = await asyncio.to_thread(arp_replies, site["client"], ip, list(pair))
    return owners(watch, cut_at, arp)


async def hapair_cut(site: LabSite, seconds: float) -> tuple[Owners, str]:
    c, lab = site.cluster, site.lab
    active, epoch = await c.active("p", timeout=20)
    pair = (site[active], site[other(active, ("a", "b"))])
    seen = await during_cut(site, pair, HAPAIR_IP + PREFIX, lambda: lab.partition(*pair), seconds)
    lead = await c.leader("p")
    lab.heal(*pair)
    kept = "kept its active" if lead == (active, epoch) else f"active now {lead}"
    return seen, f"{kept} ({active}, epoch {epoch})"


async def keepalived_cut(site: LabSite, pair: KeepalivedPair, seconds: float) -> Owners:
    master = await pair.started()
    nodes = (master, next(h for h in pair.hosts if h != master))
    lab = site.lab
    seen = await during_cut(site, nodes, pair.vip, lambda: cut_between(lab, *nodes), seconds)
    heal_between(lab, *nodes)

    async def one_owner() -> bool:
        return len(await asyncio.to_thread(pair.holders)) == 1

    await until(one_owner, 15, "one keepalived node holding the address after the heal")
    return seen


# ---- the run --------------------------------------------------------------------------


def crash_table(results: dict[str, list[float]]) -> None:
    print("\ncrash of the active -> the other node answers through the address (client host)")
    print(f"{'':<34} {'runs':>4} {'median':>8} {'min':>7} {'max':>7}")
    for name, values in results.items():
        print(
            f"{name:<34} {len(values):>4} {statistics.median(values):>8.3f} "
            f"{min(values):>7.3f} {max(values):>7.3f}"
        )


async def measure(tmp: Path, runs: int, cut_s: float, lab_mode: bool) -> int:
    crashes: dict[str, list[float]] = {}
    cuts: dict[str, Owners] = {}
    async with LabSite(tmp, ["a", "b"], ("client", "ka", "kb"), secure=not lab_mode) as site:
        port = await start_hapair(site)

        def pair_of(vrrp: Vrrp) -> KeepalivedPair:
            hosts = (site["ka"], site["kb"])
            workdir = tmp / f"keepalived-{vrrp.advert_int:g}"
            return KeepalivedPair(site.lab, hosts, KEEPALIVED_IP + PREFIX, port, workdir, vrrp)

        async def hapair_phase() -> None:
            crashes[HAPAIR] = await hapair_crashes(site, port, runs)
            cuts[HAPAIR], kept = await hapair_cut(site, cut_s)
            print(f"  hapair, link between the nodes cut: the pair {kept}", flush=True)

        async def keepalived_phase(vrrp: Vrrp) -> None:
            pair = pair_of(vrrp)
            try:
                crashes[str(vrrp)] = await keepalived_crashes(site, pair, runs)
                pair.stop()
                cuts[str(vrrp)] = await keepalived_cut(site, pair, cut_s)
            finally:
                pair.stop()

        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("hapair", hapair_phase),
            (str(FASTEST), lambda: keepalived_phase(FASTEST)),
            (str(DEFAULTS), lambda: keepalived_phase(DEFAULTS)),
        ]
        for name, phase in phases:
            print(f"{name}:", flush=True)
            await phase()
    checked = site.cluster.assert_no_overlap()  # every agent stopped: records complete
    print(f"\nhapair: no overlap of its service across {checked} runs")
    crash_table(crashes)
    print(f"\nlink between the two nodes cut for {cut_s:g} s, both reaching etcd and the client")
    print(
        f"{'':<34} {'readings':>8} {'2 owners from':>15} {'2 owners in':>11} "
        f"{'proven':>7}  {'held by':<7} ARP replies from"
    )
    for name, seen in cuts.items():
        print(seen.line(name))
    print(
        "readings: of either node's addresses, after the cut; 2 owners from: the first\n"
        "reading at which each node's latest reading had the address; 2 owners in: the\n"
        "share of readings so; proven: readings of one node holding it taken between two\n"
        "readings of the other holding it"
    )
    return 0


async def main(runs: int, cut_s: float, lab_mode: bool) -> int:
    why = unavailable() or missing()
    if why is not None:
        print(f"skipped: {why}")
        return 0
    print(f"etcd: {etcd_mode(lab_mode)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hapair-bench-keepalived-"))
    try:
        return await measure(tmp, runs, cut_s, lab_mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cut-s", type=float, default=5.0, help="how long the link is cut")
    parser.add_argument("--lab", action="store_true", help=LAB_HELP)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.runs, args.cut_s, args.lab)))
