"""An agent's Prometheus metrics: its role and term, its lease and fence margin, its
services, over HTTPS to a client certificate of the site CA."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from hapair.shared import pki
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port
from tests.support.metrics import Sample, samples, scrape, value

NET = 93


def metrics_flags(directory: Path, node: str, port: int) -> list[str]:
    address = f"127.0.{NET}.{'ab'.index(node) + 1}"
    pki.issue(directory, "metrics", f"metrics-{node}", ips=[address])
    files = pki.TlsFiles.issued(directory, f"metrics-{node}")
    return [
        *("--metrics-listen", f"{address}:{port}"),
        *("--metrics-cert", str(files.cert), "--metrics-key", str(files.key)),
        *("--metrics-ca", str(files.ca)),
    ]


async def test_the_active_and_the_standby_in_their_metrics(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    directory = tmp_path / "metrics-pki"
    pki.init(directory, "metrics")
    pki.issue(directory, "prometheus", "prom")
    prometheus = pki.TlsFiles.issued(directory, "prom").client_context()
    ports = {"a": free_port(), "b": free_port()}
    await c.apply(c.site([pair("p", ["a", "b"], NET, free_port(), c.record)]))
    c.start("a", *metrics_flags(directory, "a", ports["a"]))
    await c.active("p", node="a")
    c.start("b", *metrics_flags(directory, "b", ports["b"]))
    await c.standby("b")

    def read(node: str) -> dict[Sample, float]:
        url = f"https://127.0.{NET}.{'ab'.index(node) + 1}:{ports[node]}/metrics"
        return samples(scrape(url, prometheus))

    async def running(node: str) -> dict[Sample, float] | None:
        try:
            found = await asyncio.to_thread(read, node)
        except OSError:
            return None
        ran = value(found, "hapair_service_state", service="p-svc", state="running")
        return found if ran == 1.0 and (value(found, "hapair_agent_lease_held") == 1.0) else None

    a = await until(lambda: running("a"), 20, "a's metrics showing its service running")
    assert value(a, "hapair_agent_active", pair="p", node="a") == 1.0
    assert (value(a, "hapair_agent_epoch") or 0) > 0
    margin = value(a, "hapair_agent_fence_margin_seconds")
    assert margin is not None and 0 < margin <= 1.5  # the default fence point, TTL 2 s
    assert (value(a, "hapair_agent_keepalive_seconds_count") or 0) > 0
    assert value(a, "hapair_agent_fences_total") == 0.0
    assert value(a, "hapair_service_state", service="p-svc", state="failed") == 0.0

    b = await asyncio.to_thread(read, "b")
    assert value(b, "hapair_agent_active", pair="p", node="b") == 0.0
    assert value(b, "hapair_agent_epoch") == 0.0
    assert value(b, "hapair_agent_lease_held") == 1.0


async def test_a_watchdog_firing_is_counted_once_its_frozen_agent_runs_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Frozen (SIGSTOP), the active cannot count what its watchdog does at the missed
    deadline; the watchdog's report waits in a pipe, and the agent counts it once
    resumed."""
    c = cluster
    directory = tmp_path / "metrics-pki"
    pki.init(directory, "metrics")
    pki.issue(directory, "prometheus", "prom")
    prometheus = pki.TlsFiles.issued(directory, "prom").client_context()
    port = free_port()
    await c.apply(c.site([pair("p", ["a", "b"], NET, free_port(), c.record)]))
    c.start("a", *metrics_flags(directory, "a", port))
    _, epoch = await c.active("p", node="a")
    c.start("b")
    await c.standby("b")
    url = f"https://127.0.{NET}.1:{port}/metrics"
    before = samples(await asyncio.to_thread(scrape, url, prometheus))
    assert value(before, "hapair_agent_watchdog_firings_total") == 0.0
    c.signal("a", signal.SIGSTOP)
    try:
        await c.active("p", not_epoch=epoch, node="b")
    finally:
        c.signal("a", signal.SIGCONT)

    async def counted() -> float | None:
        try:
            found = samples(await asyncio.to_thread(scrape, url, prometheus))
        except OSError:
            return None
        return value(found, "hapair_agent_watchdog_firings_total")

    assert await until(counted, 10, "a's metrics counting the firing") == 1.0
