"""The long-polls' deadlines: one timer for them all, each woken at its own."""

from __future__ import annotations

import asyncio

from hapair.registry.cache import COMPACT_EVERY, Deadlines

SLACK_S = 0.005  # the event loop's clock resolution, at most


async def test_each_is_woken_at_its_deadline_in_order() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    now = loop.time()
    woken_at: dict[float, float] = {}
    futures = []
    for offset in (0.15, 0.05, 0.1):  # the earliest comes second: the timer moves to it
        future: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(lambda _, o=offset: woken_at.setdefault(o, loop.time()))
        deadlines.add(now + offset, future)
        futures.append(future)
    async with asyncio.timeout(5):
        await asyncio.gather(*futures)
    assert sorted(woken_at, key=woken_at.__getitem__) == [0.05, 0.1, 0.15]
    assert all(woken_at[o] >= now + o - SLACK_S for o in woken_at)


async def test_one_woken_first_is_left_alone_and_the_others_still_come() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    early: asyncio.Future[None] = loop.create_future()
    later: asyncio.Future[None] = loop.create_future()
    deadlines.add(loop.time() + 0.02, early)
    deadlines.add(loop.time() + 0.05, later)
    early.set_result(None)  # news came first
    async with asyncio.timeout(5):
        await later


async def test_those_woken_already_do_not_pile_up() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    far = loop.time() + 3600
    for _ in range(3 * COMPACT_EVERY):
        future: asyncio.Future[None] = loop.create_future()
        deadlines.add(far, future)
        future.set_result(None)  # each woken by news long before its deadline
    assert len(deadlines) <= COMPACT_EVERY
