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
from types import SimpleNamespace

import pytest

from hapair.shared.client.reconnect import race_change
from hapair.shared.log import EventLog
from hapair.shared.store import _uncancelled
from hapair.shared.waits import cancelled, wait_event
from hapair.workshop_agent.tasks import Tasks


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


class SlowToLetGo:
    """A resolver whose wait for a newer endpoint takes a moment to end once cancelled."""

    def __init__(self) -> None:
        self.letting_go = asyncio.Event()

    async def newer(self, service: str, than: object, timeout: float) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.letting_go.set()
            await asyncio.sleep(0.05)
            raise

    def current(self, service: str) -> None:
        return None


async def test_a_caller_cancelled_as_race_change_lets_its_watch_go_is_cancelled() -> None:
    """The work done, the race cancels its watch for a move and waits for it to end;
    the caller cancelled meanwhile (an adapter closed) must end, not run on: a keeper
    that ran on waited for good on a connection that nobody kept any more."""
    resolver = SlowToLetGo()

    async def work() -> int:
        return 1

    async def caller() -> None:
        endpoint = SimpleNamespace(service="svc")
        await race_change(resolver, endpoint, work(), 5.0)  # type: ignore[arg-type]
        await asyncio.Event().wait()  # where a swallowed cancellation leaves it

    task = asyncio.create_task(caller())
    await resolver.letting_go.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done and task.cancelled()


async def test_cancelled_ends_the_tasks_and_still_cancels_its_caller() -> None:
    resolver = SlowToLetGo()
    child = asyncio.create_task(resolver.newer("svc", None, 5.0))
    failed = asyncio.create_task(asyncio.sleep(0, result=None))
    await asyncio.sleep(0)

    async def caller() -> None:
        await cancelled(child, failed)
        await asyncio.Event().wait()

    task = asyncio.create_task(caller())
    await resolver.letting_go.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done and task.cancelled()
    await asyncio.wait({child})
    assert child.cancelled()
    await cancelled(child)  # ended already: nothing to wait for


async def test_cancelled_gives_the_errors_of_tasks_that_failed_and_cancels_the_rest() -> None:
    """A runner that failed must not break off its caller's cleanup (a service left
    running by a stop): its error comes back to be reported."""

    async def fails() -> None:
        raise ValueError("broken runner")

    failed = asyncio.create_task(fails())
    running = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    errors = await cancelled(failed, None, running)
    assert [str(err) for err in errors] == ["broken runner"]
    assert running.cancelled()


async def test_an_agent_loop_cancelled_while_it_waits_on_its_work_ends_that_work() -> None:
    """``until_stopped`` cancelled (the agent's main loop torn down) takes its work down
    with it: left running, the work would act for a loop that no longer follows it."""
    tasks = Tasks(EventLog("test"), asyncio.Event())
    started, ended = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    caller = asyncio.create_task(tasks.until_stopped(work()))
    await started.wait()
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=5.0)
    assert caller in done and caller.cancelled()
    assert ended.is_set(), "the work outlived its loop"
