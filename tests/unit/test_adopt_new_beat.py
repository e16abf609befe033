"""A node taking up its own leader key: the term as it is, or, when the site changed the
pair's term beat, the term given up to itself for a new one, only when that new term
follows at once and the database has stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from hapair.shared.log import EventLog
from hapair.workshop_agent.decide import NEW_TERM_BEAT
from hapair.workshop_agent.take_over import TakeOvers
from hapair.workshop_agent.term_beat import BeatTiming
from tests.unit.test_decide import PAIR

OLD = BeatTiming(0.05, 0.15, 0.15)
NEW = BeatTiming(0.09, 0.35, 0.35)


@dataclass
class Node:
    """Everything ``adopt`` reaches, recorded."""

    term_timing: BeatTiming | None = OLD
    pair_timing: BeatTiming | None = OLD
    db_stopped: bool = True
    given_up: list[tuple[int, str, bool]] = field(default_factory=list)
    begun: list[int] = field(default_factory=list)
    local: list[tuple[str, Any, int]] = field(default_factory=list)


class Beating:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def term_timing(self, epoch: int) -> BeatTiming | None:
        return self.node.term_timing

    def pair_timing(self) -> BeatTiming | None:
        return self.node.pair_timing

    async def beat_once(self, epoch: int, timing: BeatTiming) -> float | None:
        return 50.0

    def begin(self, epoch: int, started: float | None, timing: BeatTiming | None) -> None:
        pass


class Election:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def to_self(self, epoch: int, request: str, planned: bool) -> int | None:
        self.node.given_up.append((epoch, request, planned))
        return 77


class Pairs:
    def __init__(self, node: Node) -> None:
        self.node = node

    def apply_local(self, key: str, kv: Any, revision: int) -> None:
        self.node.local.append((key, kv, revision))


class Anything:
    """A part whose calls do not matter here."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: True


class DbCare(Anything):
    def __init__(self, node: Node) -> None:
        self.node = node

    def stopped(self) -> bool:
        return self.node.db_stopped


def take_overs(node: Node, database: bool = False) -> TakeOvers:
    return TakeOvers(
        Anything(),  # type: ignore[arg-type]
        Election(node),  # type: ignore[arg-type]
        Pairs(node),  # type: ignore[arg-type]
        Anything(),  # type: ignore[arg-type]
        Anything(),  # type: ignore[arg-type]
        Anything(),  # type: ignore[arg-type]
        DbCare(node) if database else None,  # type: ignore[arg-type]
        Anything(),  # type: ignore[arg-type]
        Beating(node),  # type: ignore[arg-type]
        lambda: 100.0,
        EventLog("test.adopt", node="a"),
        "a",
        pair=lambda: PAIR,
        state=lambda: None,
        last_leader=lambda: "a",
        begin_term=lambda epoch, held: node.begun.append(epoch),
        db_ready=lambda: False,
        event=lambda *a, **kw: None,
        changed=lambda: None,
    )


async def test_the_same_beat_takes_the_term_up_as_it_is() -> None:
    node = Node()
    await take_overs(node).adopt(40, "took up its own leader key", renewable=True)
    assert node.begun == [40] and not node.given_up


async def test_a_changed_beat_gives_the_term_up_to_itself_as_a_planned_handover() -> None:
    node = Node(pair_timing=NEW)
    await take_overs(node).adopt(40, "took up its own leader key", renewable=True)
    # Planned: the new term holds no service for an operator, as the old one did not.
    assert node.given_up == [(40, NEW_TERM_BEAT, True)] and not node.begun
    assert node.local == [(f"/hapair/v1/pairs/{PAIR.name}/leader", None, 77)]


@pytest.mark.parametrize("now", [None, NEW])
async def test_a_node_that_would_not_win_the_new_term_at_once_takes_the_old_one_up(
    now: BeatTiming | None,
) -> None:
    node = Node(pair_timing=now)
    await take_overs(node).adopt(40, "took up its own leader key", renewable=False)
    assert node.begun == [40] and not node.given_up


async def test_the_term_is_given_up_only_once_the_fences_demotion_has_stopped_the_database() -> (
    None
):
    node = Node(pair_timing=NEW, db_stopped=False)
    parts = take_overs(node, database=True)
    await parts.adopt(40, "took up its own leader key", renewable=True)
    assert not node.given_up and not node.begun, "neither: the next round looks again"
    node.db_stopped = True
    await parts.adopt(40, "took up its own leader key", renewable=True)
    assert node.given_up == [(40, NEW_TERM_BEAT, True)]
