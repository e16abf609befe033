"""A one-second lease: what etcd grants for it, and a pair that runs on it.

etcd grants no lease shorter than 1.5 of its election timeouts, rounded up to a second:
2 s with its defaults (100 / 1000 ms), 1 s with the raft timing that
``deploy/etcd/etcd.conf.yml`` ships for a plant (50 / 500 ms).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.store import Store
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, checked_cluster, pid_alive, until
from tests.support.harness import free_port, plant_raft_timing
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

pytestmark = pytest.mark.e2e


@pytest.fixture
def plant_etcd(test_pki: TestPki) -> Iterator[TlsEtcd]:
    """An etcd of its own with the plant's raft timing (the session's has etcd's)."""
    etcd = TlsEtcd(test_pki.dir, ADMIN, extra_args=plant_raft_timing())
    try:
        yield etcd.start()
    finally:
        etcd.cleanup()


@pytest.fixture
async def plant_cluster(plant_etcd: TlsEtcd, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with checked_cluster(plant_etcd, tmp_path) as c:
        yield c


async def granted_ttl(store: Store, key: str) -> int | None:
    """The TTL etcd granted the lease ``key`` is written on (None: no such key)."""
    kv = await store.get(key)
    if kv is None:
        return None
    info = await store.call(lambda: store.client.get_lease_info(kv.lease))
    return int(info.grantedTTL)


async def one_second_pair(c: Cluster, net: int) -> int:
    spec: dict[str, Any] = pair("p", ["a", "b"], net, free_port(), c.record, lease_ttl_s=1.0)
    await c.apply(c.site([spec]))
    c.start("a")
    _, epoch = await c.active("p", node="a")
    c.start("b")
    await c.standby("b")
    return epoch


async def test_a_crashed_active_on_a_one_second_lease_is_taken_over(
    plant_cluster: Cluster,
) -> None:
    c = plant_cluster
    epoch = await one_second_pair(c, 231)
    assert await granted_ttl(c.store, keys.leader("p")) == 1
    assert await granted_ttl(c.store, keys.node_status("b")) == 1
    crashed_at = time.monotonic()
    for pid in c.crash("a"):
        assert not pid_alive(pid)
    node, new_epoch = await c.active("p", not_epoch=epoch)
    took = time.monotonic() - crashed_at
    assert node == "b" and new_epoch > epoch
    # The crash came at most one keepalive interval (0.25 s) after a keepalive that etcd
    # received, so the 1 s lease cannot have expired before 0.75 s: nobody may take over
    # earlier. The upper bound is a liveness deadline only (the figure is in bench/).
    assert 0.5 < took < 4.0, took
    endpoint = await until(lambda: c.endpoint("p-svc"), 5, "endpoint of b")
    assert endpoint.epoch == new_epoch
    assert "longer lease than asked" not in c.log("b")


async def test_a_one_second_lease_on_an_etcd_that_grants_two_is_said(cluster: Cluster) -> None:
    """The session's etcd has etcd's default raft timing: it grants 2 s. The agents run
    (their fence point counts from the 1 s asked) and say why a crash takes longer."""
    await one_second_pair(cluster, 232)
    assert await granted_ttl(cluster.store, keys.leader("p")) == 2
    for node in ("a", "b"):
        log = cluster.log(node)
        assert "etcd grants a longer lease than asked" in log, log[-2000:]
        assert "asked=1.0 granted=2" in log
