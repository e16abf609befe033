"""The store's typed errors that need no etcd."""

from __future__ import annotations

import pytest

from hapair.shared import keys
from hapair.shared.store import LeaseNotFound, Store, StoreError, Timeout, Unavailable
from tests.support.harness import free_port


async def test_no_member_to_connect_to_is_unavailable() -> None:
    s = Store(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    try:
        with pytest.raises(Unavailable):
            await s.get(keys.PREFIX + "/errors/k")
    finally:
        await s.close()


def test_every_typed_error_is_a_store_error() -> None:
    assert all(issubclass(e, StoreError) for e in (LeaseNotFound, Timeout, Unavailable))
