"""Fixtures any test module may use: one etcd for the session, a clean prefix per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from harness import Etcd

from shared import keys
from shared.store import Store


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """A real etcd on free ports, shared by the session; use ``store`` for a clean prefix."""
    server = Etcd().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    """A connection to the session's etcd with nothing under ``/hapair/v1``."""
    s = Store(etcd.url, timeout=2.0)
    await s.call(lambda: s.client.delete_prefix(keys.b(keys.PREFIX + "/")))
    try:
        yield s
    finally:
        await s.close()
