"""The registry's Prometheus metrics: the site as it sees it, and its own lookups."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from hapair.shared import keys, pki, records
from hapair.shared.store import Store
from tests.integration.test_client_resolver import active_pair
from tests.support.client_lab import RegistryProcess, until
from tests.support.harness import Etcd, free_port
from tests.support.metrics import Sample, samples, scrape, value


@pytest.fixture
async def registry(etcd: Etcd, tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """A registry (plain HTTP for lookups) with its metrics over HTTPS: (lookup URL,
    metrics URL, the PKI directory)."""
    directory = tmp_path / "pki"
    pki.init(directory, "test")
    pki.issue(directory, "metrics", "reg-1", ips=["127.0.0.1"])
    pki.issue(directory, "prometheus", "prom")
    metrics_port = free_port()
    metrics = (
        *("--metrics-listen", f"127.0.0.1:{metrics_port}"),
        *("--metrics-cert", str(directory / "reg-1.crt")),
        *("--metrics-key", str(directory / "reg-1.key")),
        *("--metrics-ca", str(directory / pki.CA_CERT)),
    )
    process = RegistryProcess(etcd, args=metrics, log=tmp_path / "registry.log")
    await process.start()
    try:
        yield process.url, f"https://127.0.0.1:{metrics_port}/metrics", directory
    finally:
        await process.stop()
        process.assert_no_traceback()


async def test_the_site_and_the_lookups_in_the_metrics(
    registry: tuple[str, str, Path], store: Store
) -> None:
    url, metrics_url, directory = registry
    await active_pair(store)
    prometheus = pki.TlsFiles.issued(directory, "prom").client_context()

    async def read() -> dict[Sample, float] | None:
        try:
            found = samples(await asyncio.to_thread(scrape, metrics_url, prometheus))
        except OSError:
            return None
        return found if value(found, "hapair_pair_has_active", pair="asm") == 1.0 else None

    found = await until(read, "the registry's metrics showing asm's active", 20)
    assert value(found, "hapair_pair_active", pair="asm", node="asm-a") == 1.0
    assert value(found, "hapair_pair_active", pair="asm", node="asm-b") == 0.0
    assert value(found, "hapair_node_up", pair="asm", node="asm-b") == 1.0
    assert value(found, "hapair_endpoint_valid", pair="asm", service="mes-api") == 1.0
    assert value(found, "hapair_registry_etcd_synced") == 1.0

    async with aiohttp.ClientSession() as session:
        for service in ("mes-api", "mes-api", "nobody"):
            async with session.get(f"{url}/v1/endpoints/{service}") as resp:
                await resp.read()
    found = samples(await asyncio.to_thread(scrape, metrics_url, prometheus))
    assert value(found, "hapair_registry_lookups_total", status="200") == 2.0
    assert value(found, "hapair_registry_lookups_total", status="404") == 1.0

    # Events written from now on are counted by kind; a kind that is no kind is "other".
    for n, kind in enumerate(("fence", "fence", 'x"} 1\nhapair_pair_has_active{pair="asm"} 0')):
        event = records.Event(kind=kind, pair="asm", node="asm-a", reason="test")
        await store.put(keys.event(1000 + n, "asm-a"), event.encode())

    async def counted() -> dict[Sample, float] | None:
        found = samples(await asyncio.to_thread(scrape, metrics_url, prometheus))
        return found if value(found, "hapair_events_total", kind="other") == 1.0 else None

    found = await until(counted, "the events counted", 10)
    assert value(found, "hapair_events_total", kind="fence") == 2.0
    assert value(found, "hapair_pair_has_active", pair="asm") == 1.0
