"""A cancellation that lands as an etcd call finishes, or as an awaited event is set,
is not lost.

Python 3.11's ``asyncio.wait_for`` returns the inner result when its caller is cancelled
in the same loop round as the call completes: the cancellation is swallowed, and a loop
that made the call (a mirror, the comm server's role) never ends. The store's bounded
call gives it back."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from hapair.shared.store import _uncancelled
from hapair.shared.waits import wait_event


async def test_a_cancel_racing_a_finished_call_still_cancels_the_caller() -> None:
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def call() -> int:
        return await answer

    caller = asyncio.create_task(_uncancelled(call(), 5.0))
    await asyncio.sleep(0)  # the caller waits in the bounded call
    await asyncio.sleep(0)
    answer.set_result(1)  # the call completes first in the next round...
    caller.cancel()  # ...and the caller is cancelled in the same round
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_call_that_finishes_uncancelled_returns_its_answer() -> None:
    async def call() -> int:
        await asyncio.sleep(0)
        return 7

    assert await _uncancelled(call(), 5.0) == 7


async def _cancel_as_the_event_is_set(wait: Callable[[asyncio.Event], Awaitable[object]]) -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait(event))
    await asyncio.sleep(0)  # the waiter waits
    event.set()  # what it waits for happens...
    waiter.cancel()  # ...in the same round as its cancellation
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_cancel_racing_the_event_a_loop_waits_for_still_cancels_it() -> None:
    await _cancel_as_the_event_is_set(lambda event: wait_event(event, 5.0))


async def test_wait_for_loses_that_cancel_in_this_python() -> None:
    """Why ``wait_event`` exists; once the interpreter is fixed, this fails and the
    helper may go."""
    if sys.version_info >= (3, 12):
        pytest.skip("asyncio.wait_for keeps the cancellation from Python 3.12 on")

    async def wait_for(event: asyncio.Event) -> object:
        return await asyncio.wait_for(event.wait(), 5.0)

    with pytest.raises(pytest.fail.Exception):
        await _cancel_as_the_event_is_set(wait_for)


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 5.0) is True
