"""The services are dead before the lease can expire, measured from the lease itself.

etcd may expire the active's lease ``lease_ttl_s`` after it received the last keepalive,
which is after the agent sent it. So the fence is measured here against the send time
of the last keepalive etcd acknowledged (the agent logs it, on ``CLOCK_BOOTTIME``, at
debug level), not against the moment of the fault: the service, which ignores SIGTERM,
must be seen dead before that send time plus the TTL, whoever killed it (the agent's
own fence, or its watchdog when the agent is frozen).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hapair.shared.clock import boottime
from tests.support.cluster import Cluster, holds, pid_alive, until

pytestmark = pytest.mark.e2e
TTL = 2.0
CONFIRMED = re.compile(r'event="lease confirmed" .*sent=([0-9.]+)')


def stubborn_service() -> dict[str, Any]:
    # Ignores SIGTERM (inherited across exec): only the SIGKILL of a fence ends it.
    return {"name": "stubborn", "command": ["sh", "-c", "trap '' TERM; exec sleep 600"]}


async def service_pid(c: Cluster) -> int:
    async def pid() -> int | None:
        st = await c.status("a")
        svc = next((s for s in st.services if s.name == "stubborn"), None) if st else None
        return svc.pid if svc is not None and svc.state == "running" else None

    return await until(pid, 10, "the service running on a")


def seen_dead(pid: int, timeout: float) -> float:
    """When ``pid`` was first seen dead (``CLOCK_BOOTTIME``); polled every 2 ms, so it is
    seen late rather than early."""
    end = boottime() + timeout
    while boottime() < end:
        if not pid_alive(pid):
            return boottime()
        time.sleep(0.002)
    raise AssertionError(f"service {pid} still alive after {timeout} s")


def last_confirmed_send(log: str) -> float:
    sends = [float(m.group(1)) for m in CONFIRMED.finditer(log)]
    assert sends, "the agent logged no confirmed keepalive (debug level)"
    return sends[-1]


@pytest.mark.parametrize("fault", ["agent frozen", "etcd frozen"])
async def test_the_service_is_dead_before_the_lease_can_expire(
    cluster: Cluster, fault: str
) -> None:
    net = 145 if fault == "agent frozen" else 146
    nodes = [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate("ab")]
    pair = {
        "name": "p",
        "nodes": nodes,
        "failover": {"lease_ttl_s": TTL},
        "services": [stubborn_service()],
    }
    await cluster.apply(cluster.site([pair]))
    cluster.start("a", "--log-level", "debug")
    await cluster.active("p", node="a", timeout=30)
    pid = await service_pid(cluster)
    etcd = cluster.etcd.proc
    assert etcd is not None
    frozen = cluster.agents["a"].pid if fault == "agent frozen" else etcd.pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        died = await asyncio.to_thread(seen_dead, pid, 10)
        # Read before the resume: no keepalive can be confirmed meanwhile.
        sent = last_confirmed_send(cluster.log("a"))
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert died < sent + TTL, (
        f"the service died {died - sent:.3f} s after the last acknowledged keepalive was "
        f"sent: etcd may have expired the lease {TTL} s after it"
    )
    if fault == "etcd frozen":
        assert "event=fenced" in cluster.log("a")


SUSPENDED_S = 1000


def _child(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


async def test_an_agent_after_a_suspend_keeps_its_services_and_fences_in_time(
    cluster: Cluster,
) -> None:
    """The agent runs in a time namespace whose CLOCK_BOOTTIME is 1000 s ahead of its
    CLOCK_MONOTONIC, as on a machine suspended that long since boot. The session, the
    fence and the watchdog must all count on the one clock: mixed with the monotonic
    one, the watchdog's deadline would lie 1000 s in the past (services killed at once)
    or ahead (never fenced)."""
    unshare = shutil.which("unshare")
    ns = [unshare or "unshare", "--time", "--boottime", str(SUSPENDED_S), "--fork"]
    ns.append("--kill-child=SIGTERM")
    probe = await asyncio.to_thread(subprocess.run, [*ns, "true"], capture_output=True)
    if unshare is None or probe.returncode:
        pytest.skip("cannot make a time namespace here (unshare --time, root)")
    nodes = [{"name": n, "address": f"127.0.148.{i + 1}"} for i, n in enumerate("ab")]
    pair = {"name": "p", "nodes": nodes, "services": [stubborn_service()]}
    await cluster.apply(cluster.site([pair]))
    spawn = cluster.spawn
    cluster.spawn = lambda node, argv, **kw: spawn(node, [*ns, *argv], **kw)  # type: ignore[method-assign]
    outer = cluster.start("a", "--log-level", "debug")
    agent = await until(lambda: asyncio.sleep(0, _child(outer.pid)), 10, "the agent started")
    try:
        await cluster.active("p", node="a", timeout=30)
        pid = await service_pid(cluster)

        async def running() -> bool:
            return pid_alive(pid)

        await holds(running, 3, "the service was killed although the lease was kept")
        os.kill(agent, signal.SIGSTOP)
        try:
            died = await asyncio.to_thread(seen_dead, pid, 10)
            sent = last_confirmed_send(cluster.log("a")) - SUSPENDED_S  # on this clock
        finally:
            os.kill(agent, signal.SIGCONT)
        assert died < sent + TTL
    finally:
        await asyncio.to_thread(_stop, agent)


def _stop(pid: int) -> None:
    """Stop the agent inside the namespace (its parent, unshare, only waits for it);
    SIGKILL after 15 s (its watchdog then kills the services)."""
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
