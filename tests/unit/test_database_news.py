"""A database beyond repair is news for the agent's loop.

The loop runs a round only on news or when a time-driven decision is due
(``decide.due``). ``Database.failure`` is an input of the decision (``db_failure``: the
active hands the pair to a recorded synchronous standby) with no instant of its own,
so whatever sets it must wake the loop, as a failed promotion does. Here the primary
fails every round of its care (``keep_primary``) until the failure is declared.
"""

from __future__ import annotations

from hapair.shared.log import EventLog
from hapair.workshop_agent.database import FAILURES_BEFORE_RESIGN
from hapair.workshop_agent.database_care import DatabaseCare
from hapair.workshop_agent.observe import PairState
from hapair.workshop_agent.pg.errors import PgError
from tests.unit.test_database_rules import FakeServer, fake_primary


class BrokenServer(FakeServer):
    """A primary that cannot be kept running: every check of it fails."""

    async def ensure_primary(self, epoch: int, hold_writes: bool = False) -> None:
        raise PgError("start", "the server does not come up")


class WatchdogStub:
    def add(self, pid: int) -> None: ...
    def remove(self, pid: int) -> None: ...
    def add_data_dir(self, path: object) -> None: ...
    def remove_data_dir(self, path: object) -> None: ...


async def test_a_primary_beyond_repair_wakes_the_decision() -> None:
    db, server, _ = fake_primary(["b"], ["b"])
    broken = BrokenServer(server.steps, server.names)
    db.manager = broken  # type: ignore[assignment]
    pair = db.pair
    news: list[str | None] = []  # the database's failure, as each wake-up saw it
    dirty: list[None] = []
    state = PairState(
        leader=None,
        leader_absent_since=None,
        peers={},
        paused=False,
        drained=frozenset(),
        switchover=None,
        switchover_raw=None,
        handover=None,
        lost={},
    )
    care = DatabaseCare(
        db,
        None,  # type: ignore[arg-type]  # not asked: the primary is this term's already
        WatchdogStub(),  # type: ignore[arg-type]
        EventLog("test", node="a"),
        "a",
        pair=lambda: pair,
        term=lambda: 7,
        state=lambda: state,
        may_run=lambda: True,
        held=frozenset,
        changed=lambda: news.append(db.failure),
        dirty=lambda: dirty.append(None),
        spawn=lambda coro, name: coro.close(),
    )
    assert db.primary_epoch == 7  # primary for this term: the care keeps it so
    for _ in range(FAILURES_BEFORE_RESIGN):
        await care._round()
    assert db.failure is not None, "the primary was not declared beyond repair"
    assert any(f is not None for f in news), (
        f"the failure ({db.failure!r}) was set without waking the decision loop: "
        "the handover to the synchronous standby waits for unrelated news"
    )
