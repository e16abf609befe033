"""Fixtures of the integration tests: one etcd for the session, a clean prefix per test,
agents as real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hapair.shared import keys
from hapair.shared.store import Store
from tests.support.cluster import Cluster, until
from tests.support.harness import Etcd, running_etcd


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """A real etcd on free ports, shared by the session; use ``store`` for a clean prefix."""
    with running_etcd() as server:
        yield server


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    """A connection to the session's etcd with nothing under ``/hapair/v1``."""
    s = Store(etcd.url, timeout=2.0)

    async def cleared() -> bool:
        await s.call(lambda: s.client.delete_prefix(keys.b(keys.PREFIX + "/")))
        return True

    # On a loaded machine gRPC's first connection may time out: the set-up waits for it
    # (a test that means to see etcd unavailable does so itself).
    await until(cleared, 30, "the session's etcd cleared for this test")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def cluster(etcd: Etcd, store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Agents as real processes against the session's etcd; at the end, every test
    proves from the services' own records that no two nodes ran a service at once."""
    c = Cluster(etcd, tmp_path)
    try:
        yield c
    finally:
        await c.stop_all()
    # Checked after every agent stopped, so the last runs are complete too.
    c.assert_no_overlap()
