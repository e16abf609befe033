"""Waiting for an event with a bound, without losing a cancellation.

Python 3.11's ``asyncio.wait_for`` returns normally when its caller is cancelled in the
same loop round as what it waits for completes: the cancellation is swallowed, and a
loop built on it (the agent's, the database care's) never ends, so the agent never
stops. ``asyncio.timeout`` delivers the cancellation to the awaiting coroutine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, at most ``seconds``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def cancelled(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended, whatever they end with (an error
    of theirs is dropped). ``suppress(CancelledError): await task`` would swallow a
    cancellation of the caller itself that lands meanwhile, and the caller would run on
    (a client's keeper then waited for good): here it propagates."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: not reported as never retrieved
