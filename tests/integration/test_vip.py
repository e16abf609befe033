"""The virtual IP: validated in the site file, held by the active node only, moved on a
crash, removed by the fence and by the watchdog, announced by gratuitous ARP.

Everything network-related runs in network namespaces (``vip_lab``), never on the
machine's own interfaces: etcd, each agent and a client on their own lab hosts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import Switchover
from hapair.shared.topology import Failover
from tests.support.cluster import holds, until
from tests.support.harness import PYTHON, ROOT, free_port
from tests.support.netns import IFNAME, Lab, unavailable
from tests.support.vip_lab import LabSite, VipWatch, afetch, has, mac, neighbour, service, until_has

NO_LAB = unavailable()
needs_lab = pytest.mark.skipif(NO_LAB is not None, reason=f"no network namespaces: {NO_LAB}")
needs_arping = pytest.mark.skipif(
    shutil.which("arping") is None, reason="arping is not installed (iputils-arping)"
)
VIP_IP = "10.99.0.100"
VIP = f"{VIP_IP}/24"


# ---- the watchdog --------------------------------------------------------------------


@needs_lab
def test_watchdog_removes_the_vip_at_the_deadline_and_when_the_agent_is_gone() -> None:
    with Lab(["n"]) as lab:
        host = lab["n"]
        for when in ("deadline", "eof"):
            host.ip("addr", "add", VIP, "dev", IFNAME)
            dog = lab.spawn(
                host, PYTHON, "-m", "hapair.workshop_agent.watchdog",
                stdin=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            assert dog.stdin is not None
            lines = [f"vip add {VIP} {IFNAME}"]
            if when == "deadline":
                lines.append(f"deadline {time.monotonic() + 0.3!r}")
            dog.stdin.write(("\n".join(lines) + "\n").encode())
            dog.stdin.flush()
            time.sleep(0.1)
            assert has(host, VIP), "removed before the deadline"
            if when == "eof":
                dog.stdin.close()
            deadline = time.monotonic() + 5
            while has(host, VIP) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not has(host, VIP), f"still there after the {when}"
            if when == "eof":
                dog.wait(5)
            else:
                dog.stdin.close()
                dog.wait(5)


# ---- end to end, in namespaces -------------------------------------------------------


async def _start_pair(site: LabSite, **extra: Any) -> int:
    port = free_port()
    c = site.cluster
    pair = {
        "name": "p",
        "nodes": [site.node_entry("a"), site.node_entry("b")],
        "services": [service("p-svc", port, c.record, critical=True)],
        "vip": {"address": VIP, "interface": IFNAME},
        **extra,
    }
    await c.apply(c.site([pair]))
    c.start("a")
    await c.active("p", node="a", timeout=20)
    c.start("b")
    await c.standby("b", timeout=20)
    return port


async def _a_active_with_the_address(site: LabSite, **extra: Any) -> tuple[int, int]:
    """The pair started (``_start_pair``), a active and holding the address: the
    service's port and a's epoch."""
    port = await _start_pair(site, **extra)
    await until_has(site["a"], VIP)
    _, epoch = await site.cluster.active("p", node="a")
    return port, epoch


async def _served_by(site: LabSite, port: int, node: str, timeout: float = 10.0) -> None:
    client = site["client"]

    async def answered() -> bool:
        body = await afetch(client, f"http://{VIP_IP}:{port}/", 0.5)
        return body is not None and json.loads(body)["node"] == node

    await until(answered, timeout, f"the client served by {node} through {VIP_IP}", step=0.05)


def _vip_mentions(site: LabSite, node: str, what: str) -> bool:
    return what in site.cluster.log(node)


@needs_lab
@needs_arping
@pytest.mark.e2e
async def test_vip_follows_the_active_through_a_crash(tmp_path: Path) -> None:
    async with LabSite(tmp_path, ["a", "b"]) as site:
        port = await _start_pair(site)
        a, b, client = site["a"], site["b"], site["client"]
        await until_has(a, VIP)
        assert not has(b, VIP)
        await _served_by(site, port, "a")
        assert neighbour(client, VIP_IP) == mac(a)

        # A server crash: agent, watchdog and services gone at once, its NIC dark.
        crashed = time.monotonic()
        site.cluster.crash("a")
        site.lab.cut(a)
        moved = await until_has(b, VIP, timeout=10)
        # The client learns the new holder from the gratuitous ARP, not by asking again.
        await until(
            lambda: asyncio.to_thread(lambda: neighbour(client, VIP_IP) == mac(b)),
            3,
            "the client's ARP cache updated by the gratuitous ARP",
        )
        await _served_by(site, port, "b")
        print(f"vip on b {moved - crashed:.2f} s after the crash")

        # The crashed server comes back with the address still configured: its agent,
        # a standby now, takes it away before anything else.
        site.lab.restore(a)
        assert has(a, VIP)
        site.cluster.start("a")
        await until_has(a, VIP, present=False, timeout=10)
        await site.cluster.standby("a", timeout=15)
        assert has(b, VIP) and not has(a, VIP)
        await _served_by(site, port, "b")
    site.cluster.assert_no_overlap()


@needs_lab
@pytest.mark.e2e
async def test_fenced_and_frozen_nodes_remove_the_vip(tmp_path: Path) -> None:
    async with LabSite(tmp_path, ["a", "b"]) as site:
        port, epoch = await _a_active_with_the_address(site)
        c = site.cluster
        a, b, etcd = site["a"], site["b"], site.etcd_host

        # a cut off from etcd and from b (the client still reaches it): a fences itself
        # before its lease can expire, and removes the address as it does.
        async with VipWatch(a, b, VIP) as watch:
            site.lab.partition(a, etcd)
            site.lab.partition(a, b)
            cut = time.monotonic()
            gone = await until_has(a, VIP, present=False, timeout=5)
            await until_has(b, VIP, timeout=10)
        assert watch.held("a") and watch.held("b")
        assert not watch.overlaps, f"the address was on both nodes at once: {watch.overlaps[:1]}"
        assert gone - cut < 2.0, f"removed {gone - cut:.2f} s after the cut, past the lease TTL"
        await _served_by(site, port, "b")
        site.lab.heal(a, etcd)
        site.lab.heal(a, b)
        _, epoch = await c.active("p", not_epoch=epoch, node="b")
        await c.standby("a", timeout=15)
        assert not has(a, VIP)
        assert _vip_mentions(site, "a", "virtual address dropped")

        # b's agent frozen: its watchdog removes the address at the fence point, while
        # the agent itself cannot do anything.
        c.signal("b", signal.SIGSTOP)
        try:
            await until_has(b, VIP, present=False, timeout=5)
            await until_has(a, VIP, timeout=10)
            await _served_by(site, port, "a")
            assert not has(b, VIP)
        finally:
            c.signal("b", signal.SIGCONT)
        await c.active("p", not_epoch=epoch, node="a")
        await c.standby("b", timeout=15)
        assert has(a, VIP) and not has(b, VIP)
        assert _vip_mentions(site, "b", f"removing virtual address(es) {VIP}")  # the watchdog
    site.cluster.assert_no_overlap()


async def _moved(site: LabSite, new: str, epoch: int) -> int:
    """Wait until ``new`` is active and holds the address; its epoch."""
    c = site.cluster
    _, epoch = await c.active("p", node=new, not_epoch=epoch, timeout=20)
    await until_has(site[new], VIP, timeout=10)
    return epoch


@needs_lab
@pytest.mark.e2e
async def test_switchover_and_resignation_move_the_vip_never_on_both(tmp_path: Path) -> None:
    async with LabSite(tmp_path, ["a", "b"]) as site:
        port, epoch = await _a_active_with_the_address(site)
        c = site.cluster
        a, b = site["a"], site["b"]

        async with VipWatch(a, b, VIP) as watch:
            await c.store.put(keys.switchover("p"), Switchover(to="b").encode())
            epoch = await _moved(site, "b", epoch)
        assert watch.held("a") and watch.held("b")
        assert not watch.overlaps, f"on both nodes at once: {watch.overlaps[:1]}"
        assert not has(a, VIP)
        await _served_by(site, port, "b")
        await c.standby("a", timeout=15)

        # b's critical service dies: b resigns, and a takes over.
        status = await c.status("b")
        assert status is not None
        (pid,) = [s.pid for s in status.services if s.name == "p-svc" and s.pid]
        async with VipWatch(b, a, VIP) as watch:
            c.kill_service(pid)
            await _moved(site, "a", epoch)
        assert watch.held("b") and watch.held("a")
        assert not watch.overlaps, f"on both nodes at once: {watch.overlaps[:1]}"
        assert not has(b, VIP)
        await _served_by(site, port, "a")
    site.cluster.assert_no_overlap()


async def _start_probing_pair(site: LabSite) -> tuple[int, int]:
    """The pair with a peer path and the client host as its probe target, a active and
    holding the address: its service's port and a's epoch."""
    network = {
        "probe_targets": [site["client"].address],
        "probe_interval_s": 0.2,
        "isolation_after_s": 1.0,
        "peer_port": 7400,
    }
    port = await _start_pair(site, network=network)
    await until_has(site["a"], VIP)
    _, epoch = await site.cluster.active("p", node="a")
    return port, epoch


@needs_lab
@pytest.mark.e2e
async def test_an_isolated_active_hands_over_and_the_vip_follows(tmp_path: Path) -> None:
    """a can no longer reach the plant network (the client host stands for it) but still
    reaches etcd and b: it hands the pair over to b, which still reaches it."""
    async with LabSite(tmp_path, ["a", "b"]) as site:
        a, b, client = site["a"], site["b"], site["client"]
        port, epoch = await _start_probing_pair(site)
        c = site.cluster
        async with VipWatch(a, b, VIP) as watch:
            site.lab.partition(a, client)
            await _moved(site, "b", epoch)
        assert watch.held("a") and watch.held("b")
        assert not watch.overlaps, f"on both nodes at once: {watch.overlaps[:1]}"
        assert not has(a, VIP)
        handovers = await c.events("switchover")
        assert [(e["node"], e["reason"]) for e in handovers] == [
            ("a", "network lost on the active")
        ]
        await _served_by(site, port, "b")
        site.lab.heal(a, client)
    site.cluster.assert_no_overlap()


async def _network(site: LabSite, node: str) -> str | None:
    """What ``node`` last said of its network (its latest ``network`` event)."""
    said = [e["reason"] for e in await site.cluster.events("network") if e["node"] == node]
    return said[-1] if said else None


@needs_lab
@pytest.mark.e2e
@pytest.mark.long
async def test_link_between_the_nodes_cut_leaves_the_vip_on_the_active_alone(
    tmp_path: Path,
) -> None:
    """The two nodes no longer reach each other (peer path and probes cut at the switch)
    while both still reach etcd and the client: each sees its peer gone, but the active's
    lease lives, so the term stays where it is and the address with it, on one node.
    (keepalived, in the same cut, puts the address on both: bench/bench_keepalived.py.)"""
    async with LabSite(tmp_path, ["a", "b"]) as site:
        a, b = site["a"], site["b"]
        port, epoch = await _start_probing_pair(site)
        c = site.cluster

        async def said(node: str, what: str) -> bool:
            return what in (await _network(site, node) or "")

        for me in ("a", "b"):
            await until(partial(said, me, "all clear"), 10, f"{me} seeing its peer")

        async def still_a() -> bool:
            return await c.leader("p") == ("a", epoch)

        async with VipWatch(a, b, VIP) as watch:
            site.lab.partition(a, b)
            for me, peer in (("a", "b"), ("b", "a")):
                lost = f"peer {peer} not visible"
                await until(partial(said, me, lost), 10, f"{me}: {lost}")
            # A lease TTL and more after both saw the cut: a standby that took its peer's
            # silence for a crash would have taken over by then.
            await holds(still_a, 2 * Failover().lease_ttl_s, "a kept its term")
            await _served_by(site, port, "a")
        assert not watch.overlaps, f"on both nodes at once: {watch.overlaps[:1]}"
        assert not watch.held("b"), "the address was on b while the nodes were cut apart"
        assert all(on for host, on, _ in watch.samples if host == "a"), "it left a"
        site.lab.heal(a, b)
        await until(partial(said, "b", "all clear"), 10, "b seeing a again")
        assert await c.leader("p") == ("a", epoch)
        assert has(a, VIP) and not has(b, VIP)
    site.cluster.assert_no_overlap()
