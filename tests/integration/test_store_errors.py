"""The store says what went wrong by the error's type, never by words to match."""

from __future__ import annotations

import asyncio

import pytest

from hapair.shared import keys
from hapair.shared.store import LeaseNotFound, Store, Timeout


async def test_a_key_on_a_lease_etcd_does_not_know_is_lease_not_found(store: Store) -> None:
    with pytest.raises(LeaseNotFound, match="lease not found"):
        await store.put(keys.PREFIX + "/errors/k", b"v", lease=0x7EADBEEF)
    assert await store.get(keys.PREFIX + "/errors/k") is None


async def test_revoking_a_lease_already_gone_is_no_error(store: Store) -> None:
    lease = await store.grant(2)
    await store.revoke(lease)
    await store.revoke(lease)  # gone already: nothing to do, nothing raised


async def test_a_call_without_an_answer_in_time_is_a_timeout(store: Store) -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(Timeout, match="did not answer in time"):
        await store.call(lambda: never, limit=0.2)
