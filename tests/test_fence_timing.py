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
import signal
import time
from typing import Any

import pytest
from cluster import Cluster, pid_alive, until

from workshop_agent.clock import boottime

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
