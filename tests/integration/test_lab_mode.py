"""The tests' etcd and agents run secure by default (TLS, client certificates, a peer
key per pair); the lab mode still works when a test asks for it, and says so at start."""

from __future__ import annotations

import asyncio

import pytest

from hapair.shared import keys
from hapair.shared.pki import TlsFiles
from hapair.shared.store import Store, StoreError
from tests.integration.test_etcd_loss import with_peer_path
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, until
from tests.support.harness import free_port

ETCD_LAB = "etcd in lab mode"
PEER_LAB = "peer path in the LAB MODE"
DEADLINE_S = 20.0


async def with_a_peer_path(cluster: Cluster, net: int) -> None:
    """Pair p of a and b with a peer path: a active, b a healthy standby."""
    spec = with_peer_path(pair("p", ["a", "b"], net, free_port(), cluster.record), net)
    await cluster.apply(cluster.site([spec]))
    cluster.start("a")
    await cluster.active("p", node="a", timeout=DEADLINE_S)
    cluster.start("b")
    await cluster.standby("b", timeout=DEADLINE_S)


async def says(cluster: Cluster, node: str, text: str) -> None:
    """Wait until ``node``'s agent has logged ``text``."""
    await until(lambda: asyncio.sleep(0, text in cluster.log(node)), DEADLINE_S, f"{node}: {text}")


@pytest.mark.lab  # the lab mode itself is what this test checks
async def test_the_lab_mode_runs_a_pair_and_says_so_at_start(cluster: Cluster) -> None:
    """http:// etcd and a peer path without a key: the pair runs, and each agent warns
    of both."""
    assert cluster.etcd.url.startswith("http://")
    await with_a_peer_path(cluster, 214)
    for node in ("a", "b"):
        await says(cluster, node, ETCD_LAB)
        await says(cluster, node, PEER_LAB)


async def test_the_default_is_tls_with_certificates_and_peer_keys(cluster: Cluster) -> None:
    """The session's etcd is https:// and refuses a client without a certificate; the
    agents show theirs and their peer path gets the pair's key, so neither warning is
    logged."""
    assert cluster.etcd.url.startswith("https://")
    await with_a_peer_path(cluster, 215)
    # Both agents have read the topology and run their peer path by now.
    for node in ("a", "b"):
        assert ETCD_LAB not in cluster.log(node) and PEER_LAB not in cluster.log(node)
    assert cluster.etcd.tls is not None
    anonymous = Store(cluster.etcd.url, timeout=1.0, tls=TlsFiles(cluster.etcd.tls.ca))
    try:
        with pytest.raises(StoreError):
            async with asyncio.timeout(DEADLINE_S):
                await anonymous.get(keys.TOPOLOGY)
    finally:
        await anonymous.close()
