"""Who may take over a pair with a database: the pure rule; and the order in which the
active changes the sync record and what its primary waits for (a fake server)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hapair.shared.database import DatabaseConfig
from hapair.shared.log import EventLog
from hapair.shared.records import SyncState
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.database import Database, eligible, named_standbys
from hapair.workshop_agent.pg.files import sync_names
from hapair.workshop_agent.pg.status import PgStatus, Replica
from tests.support.pg_harness import database_section

SYNC = DatabaseConfig.model_validate(database_section(Path("/srv"), 5432, synchronous=True))
ASYNC = DatabaseConfig.model_validate(database_section(Path("/srv"), 5432, synchronous=False))


def test_without_a_synchronous_database_anyone_may() -> None:
    assert eligible(None, None, "b", "a")
    assert eligible(ASYNC, SyncState(primary="a"), "b", "a")


def test_a_new_site_waits_for_the_main() -> None:
    assert eligible(SYNC, None, "a", "a")
    assert not eligible(SYNC, None, "b", "a")


def test_only_the_recorded_nodes_hold_every_commit() -> None:
    record = SyncState(primary="a", sync=["b"])
    assert eligible(SYNC, record, "b", "a")
    assert eligible(SYNC, record, "a", "a")
    assert not eligible(SYNC, record, "c", "a")


def test_degraded_primary_alone_may_come_back() -> None:
    record = SyncState(primary="a", sync=[], degraded=True)
    assert eligible(SYNC, record, "a", "a")
    assert not eligible(SYNC, record, "b", "a")


def test_with_a_quorum_only_the_standby_that_received_most_takes_over() -> None:
    record = SyncState(primary="a", sync=["b", "c"])
    received = {"a": None, "b": 1000, "c": 2000}
    assert eligible(SYNC, record, "c", "a", received)
    assert not eligible(SYNC, record, "b", "a", received)
    # Equal positions may both go (the priority delay then picks the preferred one).
    assert eligible(SYNC, record, "b", "a", {"b": 2000, "c": 2000})
    # A standby that does not know its own position defers to one that does.
    assert not eligible(SYNC, record, "b", "a", {"b": None, "c": 5})


def test_with_a_quorum_a_standby_that_does_not_answer_may_hold_what_the_others_lack() -> None:
    """Under ``ANY 1 (b, c)`` a commit may be on b alone: c may take over only once b
    answered and c received at least as much. The pair waits otherwise (an operator may
    force a node), rather than promote a standby that may lack commits."""
    record = SyncState(primary="a", sync=["b", "c"])
    assert not eligible(SYNC, record, "c", "a", {"a": None, "b": None, "c": 2000})
    assert not eligible(SYNC, record, "c", "a", {"a": None, "c": 2000})  # b not even listed
    assert not eligible(SYNC, record, "c", "a", None)
    assert not eligible(SYNC, record, "b", "a", {"b": None, "c": None})
    assert eligible(SYNC, record, "c", "a", {"a": None, "b": 2000, "c": 2000})
    # The recorded primary holds everything whatever the standbys say.
    assert eligible(SYNC, record, "a", "a", {"a": None, "b": None, "c": None})
    three = SyncState(primary="a", sync=["b", "c", "d"])
    assert not eligible(SYNC, three, "b", "a", {"b": 9, "c": 5, "d": None})
    assert eligible(SYNC, three, "b", "a", {"b": 9, "c": 5, "d": 9})


# -- the order of the record and the primary's setting, against a fake server ----------


class FakeServer:
    """The active's PostgreSQL as ``Database`` sees it: which standbys it names in
    ``synchronous_standby_names``, which stream and how far they flushed. Every step
    that changes what a commit may wait for, and every record write, lands in ``steps``
    in the order it happened."""

    def __init__(self, steps: list[str], names: list[str]) -> None:
        self.steps = steps
        self.names = names
        self.flushed: dict[str, int] = {}  # streaming standbys and their flush position
        self.position = 100

    async def ensure_primary(self, epoch: int, hold_writes: bool = False) -> None:
        return None

    def postmaster_pid(self) -> int:
        return 1

    async def status(self) -> PgStatus:
        many = len(self.names) > 1
        replicas = tuple(
            Replica(
                name=name,
                address=None,
                state="streaming",
                sent_lsn=lsn,
                flush_lsn=lsn,
                replay_lsn=lsn,
                lag_bytes=0,
                lag_s=0.0,
                sync_state=("quorum" if many else "sync") if name in self.names else "async",
            )
            for name, lsn in sorted(self.flushed.items())
        )
        return PgStatus(
            role="primary", pid=1, lsn=self.position, replicas=replicas,
            synchronous_standby_names=sync_names(self.names),
        )  # fmt: skip

    async def restore_sync(self, names: Sequence[str]) -> list[str]:
        self.names = list(names)
        self.steps.append("names " + ",".join(self.names))
        return [n for n in self.names if n in self.flushed]

    async def degrade_to_async(self) -> None:
        self.names = []
        self.steps.append("names none")

    async def flush_position(self) -> int:
        return self.position


class FakeElection:
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps
        self.refuse = False

    async def put_guarded(self, epoch: int, key: str, value: bytes, lease: int | None) -> bool:
        if self.refuse:
            return False
        record = SyncState.model_validate_json(value)
        self.steps.append("record " + (",".join(record.sync) or "primary only"))
        return True


def fake_primary(
    names: list[str], recorded: list[str]
) -> tuple[Database, FakeServer, FakeElection]:
    steps: list[str] = []
    server, election = FakeServer(steps, names), FakeElection(steps)
    pair = Pair(
        name="p", nodes=[Node(name=n, address=f"127.0.0.{i}") for i, n in enumerate("abc", 1)]
    )
    a = pair.nodes[0]
    db = Database(SYNC, pair, a, election, EventLog("test", node="a"), lambda: None)  # type: ignore[arg-type]
    db.manager = server  # type: ignore[assignment]
    db.primary_epoch = 7
    db._recorded = SyncState(primary="a", sync=recorded, epoch=7)
    return db, server, election


async def test_a_standby_joining_a_quorum_is_recorded_before_the_primary_may_wait_for_it() -> None:
    db, server, _ = fake_primary(["b"], ["b"])
    server.flushed = {"b": 100, "c": 40}
    await db.keep_primary(7, {"b", "c"})
    assert server.steps[:2] == ["record b,c", "names b,c"]


async def test_a_replaced_standby_is_unrecorded_only_once_its_successor_flushed() -> None:
    """b recorded and named, b gone, c streaming: the record names b and c before the
    primary waits for c alone, and c alone only once c flushed the primary's position
    taken after it was named alone."""
    db, server, _ = fake_primary(["b"], ["b"])
    server.flushed = {"c": 40}
    await db.keep_primary(7, {"c"})
    assert server.steps == ["record b,c", "names c"]
    server.position = 150
    for _ in range(3):
        await db.keep_primary(7, {"c"})
    assert server.steps == ["record b,c", "names c"], "c recorded alone before it flushed"
    server.flushed["c"] = 150
    await db.keep_primary(7, {"c"})
    assert server.steps == ["record b,c", "names c", "record c"]


async def test_a_quorum_shrinks_in_the_record_only_once_the_rest_flushed() -> None:
    """Under ``ANY 1 (b, c)`` b stops: a commit may be on b alone. The primary waits for
    c alone first; the record drops b only once c flushed past that."""
    db, server, _ = fake_primary(["b", "c"], ["b", "c"])
    server.flushed = {"c": 90}
    await db.keep_primary(7, {"c"})
    await db.keep_primary(7, {"c"})
    assert server.steps == ["names c"], "the record shrank before c flushed"
    server.flushed["c"] = 100
    await db.keep_primary(7, {"c"})
    assert server.steps == ["names c", "record c"]


async def test_the_primary_names_no_standby_the_record_could_not_take_in_first() -> None:
    db, server, election = fake_primary(["b"], ["b"])
    server.flushed = {"b": 100, "c": 100}
    election.refuse = True
    for _ in range(3):
        await db.keep_primary(7, {"b", "c"})
    assert server.steps == [] and server.names == ["b"]


def test_the_standbys_a_setting_names() -> None:
    assert named_standbys("") == set() and named_standbys(None) == set()
    for names in (["b"], ["b", "c"], ["b", "c", "d"]):
        assert named_standbys(sync_names(names)) == set(names)
    assert named_standbys("FIRST 1 (b, c)") == {"b", "c"}
    assert named_standbys("b") == {"b"}
