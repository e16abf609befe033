"""The member sets a hold must count on: the one the view shows and those sent whose
outcome etcd has not told."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.store import Timeout
from hapair.shared.topology import Pair, parse_site
from hapair.workshop_agent.members import MemberSets
from hapair.workshop_agent.observe import PairObserver


def three_nodes() -> Pair:
    nodes = [{"name": n, "address": f"127.0.9.{i + 1}"} for i, n in enumerate("abc")]
    site = parse_site(
        {"site": "s", "workshops": [{"name": "w", "pairs": [{"name": "p", "nodes": nodes}]}]},
        "test",
    )
    pair = site.pair_of_node("a")
    assert pair is not None
    return pair


class Unanswered:
    """etcd that never answers a member set's write in time (it may apply it later)."""

    async def write_members(self, term: int, nodes: frozenset[str]) -> None:
        raise Timeout("etcd did not answer in time")


async def sent_unanswered() -> tuple[MemberSets, Pair]:
    """A member set of a, b and c sent at epoch 7 and not answered."""
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        tasks.append(asyncio.create_task(coro))

    members = MemberSets(
        PairObserver("a", EventLog("test")),
        Mirror(None, "pairs/"),  # type: ignore[arg-type]  # the view only: no watch runs
        EventLog("test"),
        moved=lambda: None,
        spawn=spawn,
    )
    pair = three_nodes()
    members.new_term(7)
    members.step(pair, 7, Unanswered())  # type: ignore[arg-type]
    await asyncio.gather(*tasks)
    assert frozenset("abc") in members.acknowledged(pair)
    return members, pair


async def test_a_set_sent_in_this_term_stays_counted_when_the_same_term_is_taken_up_again() -> None:
    """A term taken up again at the same epoch (its own key, after a fence) is the same
    term for etcd: the unanswered write may still be applied, so its set still counts."""
    members, pair = await sent_unanswered()
    members.new_term(7)
    assert frozenset("abc") in members.acknowledged(pair)


async def test_a_set_sent_in_an_earlier_term_is_forgotten() -> None:
    """A write guarded by an earlier epoch can no longer be applied."""
    members, pair = await sent_unanswered()
    members.new_term(8)
    assert members.acknowledged(pair) == [None]
