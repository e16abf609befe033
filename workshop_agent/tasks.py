"""The agent's own tasks: each one seen if it fails or is cancelled other than by a
stop, all of them ended at the stop, and where each waits when the agent seems stuck."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from typing import Any

from hapair.shared.log import EventLog
from hapair.shared.waits import cancelled


class Tasks:
    """``stopping`` is set once the agent stops: from then on a task's end is expected."""

    def __init__(self, log: EventLog, stopping: asyncio.Event) -> None:
        self.log = log
        self.stopping = stopping
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.stopping.is_set():
            return
        if task.cancelled():
            # Only a stop cancels the agent's tasks: anything else is a bug to see.
            self.log.error("internal task cancelled", task=task.get_name())
        elif (err := task.exception()) is not None:
            self.log.exception("internal task failed", err, task=task.get_name())

    async def until_stopped(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` until it ends or the agent stops, whichever comes first."""
        work = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancelled(work, stop)  # one that ended is left as it ended
        if not work.cancelled():
            work.result()

    async def cancel_all(self, timeout: float) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: a task stuck in a library that swallows its cancellation must not
            # keep the agent from stopping (its services are already stopped).
            _, stuck = await asyncio.wait(set(self._tasks), timeout=timeout)
            if stuck:
                self.log.warning("tasks did not stop", tasks=",".join(t.get_name() for t in stuck))

    def dump(self) -> None:
        """SIGUSR2: where every task of the agent is waiting, one event per task (for an
        agent that seems stuck; the loop itself answers, or this would not run)."""
        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(limit=12, file=out)
            self.log.warning(
                "task", task=task.get_name(), stack=out.getvalue().replace("\n", " | ")
            )
