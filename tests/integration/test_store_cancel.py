"""A store call tells its caller's cancellation from the call's own.

gRPC may answer a call cancelled with its caller by an error of its own; taken for
etcd's answer, that error made a mirror retry for ever instead of stopping. The other
way round, closing a channel (the store moving to another member) cancels the calls
still on it; taken for the caller's own cancellation, that ended an agent's publisher
for good, without a word.
"""

from __future__ import annotations

import asyncio

import aetcd
import pytest

from hapair.shared.store import Store


async def test_a_call_cancelled_as_the_library_fails_it_ends_cancelled(store: Store) -> None:
    """The worst case: the call fails (as gRPC fails a call cancelled under it) in the
    same turn of the loop as its caller is cancelled."""
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.create_task(store.call(lambda: answer, limit=30))
    await asyncio.sleep(0.05)  # the call is waiting for its answer
    answer.set_exception(aetcd.ClientError("Locally cancelled by application!"))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5)


async def test_a_call_that_fails_by_itself_is_a_store_error(store: Store) -> None:
    async def fails() -> None:
        raise aetcd.ClientError("refused")

    from hapair.shared.store import StoreError

    with pytest.raises(StoreError, match="refused"):
        await store.call(fails)


async def test_a_call_cancelled_under_its_caller_is_a_store_error(store: Store) -> None:
    """As when the store closes the channel of a member it left: the caller goes on."""
    from hapair.shared.store import StoreError

    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.create_task(store.call(lambda: answer, limit=30))
    await asyncio.sleep(0.05)
    answer.cancel()  # the call is cancelled; its caller is not
    with pytest.raises(StoreError, match="connection was closed"):
        await asyncio.wait_for(call, 5)
