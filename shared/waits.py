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


async def cancelled(*tasks: asyncio.Future[Any] | None) -> list[BaseException]:
    """Cancel ``tasks`` (``None``: none there) and wait until they have ended; the errors
    of those that failed instead, for the caller to report. ``suppress(CancelledError):
    await task`` would swallow a cancellation of the caller itself that lands meanwhile,
    and the caller would run on (a client's keeper then waited for good), or raise a
    task's own error in the middle of the caller's cleanup: here the one propagates and
    the other is returned."""
    there = [task for task in tasks if task is not None]
    for task in there:
        task.cancel()
    if there:
        await asyncio.wait(there)
    return [err for task in there if not task.cancelled() and (err := task.exception())]
