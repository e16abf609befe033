"""The sync record, the primary's own setting and the process fences, kept in order by
the agent's database care (``hapair.workshop_agent.database.Database``): real PostgreSQL, real
etcd, the rounds of the active's database loop called one by one so each step can be
placed exactly.

The rules: only nodes holding every acknowledged commit are recorded; the primary
stops waiting for a standby only once the record no longer names it; a standby is
recorded only once it flushed what the primary had when it was added.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.process_context import ProcessContext, StaleEpoch
from hapair.shared.records import SyncState, decode
from hapair.shared.store import Store
from hapair.workshop_agent.database import Database, eligible
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.pg import query as q
from hapair.workshop_agent.pg.proc import children
from tests.support.harness import Etcd
from tests.support.pg_harness import (
    PgCluster,
    ids_on,
    needs_postgres,
    primary_with_standbys,
    running_cluster,
    stalled_walsender,
)
from tests.support.pg_harness import until as pg_until

pytestmark = needs_postgres


@dataclass
class Primary:
    """Node ``a``'s database care, primary for ``epoch``, b its streaming standby."""

    cluster: PgCluster
    store: Store
    db: Database
    epoch: int

    async def record(self) -> SyncState | None:
        kv = await self.store.get(keys.sync_standby(self.cluster.pair.name))
        return None if kv is None else decode(SyncState, kv.value, kv.key)

    async def sync_names(self) -> str:
        conn = await self.cluster.mgr["a"].pg.local()
        return (await q.primary_position(conn)).sync_names

    async def round(self, peers_up: set[str]) -> None:
        """One round of the active's database loop."""
        await self.db.keep_primary(self.epoch, peers_up)

    async def rounds_until(
        self, peers_up: set[str], cond: Callable[[], Awaitable[bool]], what: str
    ) -> None:
        async def step() -> bool:
            await self.round(peers_up)
            return await cond()

        await pg_until(step, 20, what, step=0.05)


async def care(cluster: PgCluster, store: Store, sync: list[str]) -> Primary:
    """a's database care takes the pair over (a new term) and runs rounds until the
    record names ``sync`` as a's synchronous standbys."""
    node = cluster.pair.node("a")
    assert node is not None
    election = Election(store, cluster.pair.name, "a")
    epoch = await election.campaign(await store.grant(60))
    assert epoch is not None
    db = Database(
        cluster.config, cluster.pair, node, election, EventLog("test", node="a"), lambda: None
    )
    db.manager = cluster.mgr["a"]
    assert await db.become_primary(epoch, None)
    p = Primary(cluster, store, db, epoch)

    async def recorded() -> bool:
        st = await p.record()
        return st is not None and sorted(st.sync) == sync

    await p.rounds_until(set(sync), recorded, f"{sync} recorded synchronous")
    return p


@pytest.fixture
async def primary(etcd: Etcd, store: Store) -> AsyncIterator[Primary]:
    async with running_cluster(2) as cluster:
        await primary_with_standbys(cluster)
        yield await care(cluster, store, ["b"])


@pytest.fixture
async def quorum(etcd: Etcd, store: Store) -> AsyncIterator[Primary]:
    """Three nodes: a primary, b and c recorded, commits wait for ``ANY 1 (b, c)``."""
    async with running_cluster(3) as cluster:
        await primary_with_standbys(cluster)
        yield await care(cluster, store, ["b", "c"])


@pytest.fixture
async def b_then_c(etcd: Etcd, store: Store) -> AsyncIterator[Primary]:
    """Three nodes: a primary, b recorded, c not yet a standby."""
    async with running_cluster(3) as cluster:
        await cluster.mgr["a"].ensure_primary(1)
        await follow(cluster, "b")
        async with await cluster.connect("a") as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
        yield await care(cluster, store, ["b"])


async def follow(c: PgCluster, name: str) -> None:
    await c.mgr[name].ensure_standby(c.address("a"))

    async def connected() -> bool:
        st = await c.mgr["a"].status()
        return any(r.name == name and r.state == "streaming" for r in st.replicas)

    await pg_until(connected, 20, f"{name} streaming from a")


async def insert(c: PgCluster, ids: range) -> None:
    async with await c.connect("a") as conn:
        for n in ids:
            await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (n,))


async def received(c: PgCluster, names: list[str]) -> dict[str, int | None]:
    return {n: (await c.mgr[n].status()).receive_lsn for n in names}


async def on_every_eligible_standby(
    p: Primary, record: SyncState | None, lsns: dict[str, int | None], ids: set[int]
) -> list[str]:
    """Were a to die now: the standbys ``eligible`` lets take over, each of which must
    hold every row in ``ids`` (acknowledged by a) once it replayed what it has."""
    assert record is not None
    c = p.cluster
    may = [n for n in lsns if eligible(c.config, record, n, "a", lsns)]
    for name in may:

        async def there(name: str = name) -> bool:
            return ids <= await ids_on(c, name)

        try:
            await pg_until(there, 10, f"every acknowledged row on {name}")
        except AssertionError:
            lost = len(ids - await ids_on(c, name))
            raise AssertionError(
                f"{name} may take over (record {record.sync}, received {lsns}) but lacks "
                f"{lost} of {len(ids)} acknowledged rows"
            ) from None
    return may


async def test_the_primary_keeps_waiting_while_the_record_still_names_its_standby(
    primary: Primary,
) -> None:
    """b is gone for longer than degrade_after_s, but the record cannot be changed (the
    term ended in etcd): b stays recorded as holding every commit, so the primary must
    keep waiting for it rather than acknowledge commits b lacks."""
    p = primary
    p.cluster.crash("b")
    await p.store.delete(keys.leader(p.cluster.pair.name))  # the guard of every write fails
    names = await p.sync_names()
    assert names, "the primary waits for b"
    deadline = asyncio.get_running_loop().time() + 3 * p.cluster.config.degrade_after_s
    while asyncio.get_running_loop().time() < deadline:
        await p.round(set())
        await asyncio.sleep(0.05)
    record = await p.record()
    assert record is not None and record.sync == ["b"], "the record was changed"
    assert await p.sync_names() == names, "degraded though the record still names b"


async def test_the_standby_is_unrecorded_before_the_primary_stops_waiting_for_it(
    primary: Primary,
) -> None:
    """Watched from outside while the rounds run: whenever the primary no longer waits
    for b, the record has already dropped b."""
    p = primary
    p.cluster.crash("b")
    seen: list[tuple[str, SyncState | None]] = []

    async def rounds() -> None:
        while True:
            await p.round(set())
            await asyncio.sleep(0.05)

    loop = asyncio.create_task(rounds())
    try:
        watcher = await p.cluster.connect("a", "postgres")
        show = "SELECT current_setting('synchronous_standby_names')"

        async def degraded() -> bool:
            (names,) = await (await watcher.execute(show)).fetchone()  # type: ignore[misc]
            if names:
                return False
            seen.append((names, await p.record()))
            return True

        await pg_until(degraded, 20, "the primary no longer waiting for b", step=0.002)
        await watcher.close()
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    _, record = seen[0]
    assert record is not None and record.sync == [] and record.degraded, (
        f"the primary stopped waiting for b while the record said {record}"
    )


async def test_a_standby_is_recorded_only_once_it_flushed_what_was_acknowledged_without_it(
    primary: Primary,
) -> None:
    """b rejoins a primary that runs asynchronously; its WAL receiver freezes (SIGSTOP)
    while commits are acknowledged without it. PostgreSQL reports b synchronous as soon
    as it is named, but b lacks those commits: it may be recorded only once it flushed
    the primary's position of the moment it was named."""
    p = primary
    c = p.cluster
    c.crash("b")

    async def degraded() -> bool:
        st = await p.record()
        return st is not None and st.degraded and not await p.sync_names()

    await p.rounds_until(set(), degraded, "a recorded asynchronous")
    await c.mgr["b"].ensure_standby(c.address("a"))

    async def b_streaming() -> bool:
        st = await c.mgr["a"].status()
        return any(r.name == "b" and r.state == "streaming" for r in st.replicas)

    await pg_until(b_streaming, 20, "b streaming from a")
    postmaster = c.mgr["b"].postmaster_pid()
    assert postmaster is not None
    receiver = next(pid for pid in children(postmaster) if _is_walreceiver(pid))
    os.kill(receiver, signal.SIGSTOP)
    try:
        async with await c.connect("a") as conn:
            for n in range(1, 201):  # acknowledged by a alone
                await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (n,))
        for _ in range(5):  # b is named synchronous; it still lacks the 200 commits
            await p.round({"b"})
        record = await p.record()
        assert record is not None and "b" not in record.sync, (
            "b recorded as holding every commit before it flushed them"
        )
    finally:
        os.kill(receiver, signal.SIGCONT)

    async def b_recorded() -> bool:
        st = await p.record()
        return st is not None and st.sync == ["b"] and not st.degraded

    await p.rounds_until({"b"}, b_recorded, "b recorded once it caught up")

    async def all_there() -> bool:  # flushed before it was recorded, replayed soon after
        return set(range(1, 201)) <= await ids_on(c, "b")

    await pg_until(all_there, 10, "the commits acknowledged without b, on b")


def _is_walreceiver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"walreceiver" in f.read()
    except OSError:
        return False


async def test_no_service_may_start_before_every_process_fence_is_raised(
    primary: Primary,
) -> None:
    """A new term on a node whose database refuses the fence raise (no connection to
    ``mes`` for a while): the database is not ready for the services until the fences
    are up, and then no older epoch may create or move any process."""
    p = primary
    c = p.cluster
    old = p.epoch
    async with await c.connect("a") as conn:
        await ProcessContext(conn, "held", old).start()
    await p.store.delete(keys.leader(c.pair.name))
    new = await p.db.election.campaign(await p.store.grant(60))
    assert new is not None and new > old
    async with await c.connect("a", "postgres") as su:
        await su.execute("ALTER DATABASE mes WITH ALLOW_CONNECTIONS false")
        try:
            for _ in range(2):
                assert not await p.db.become_primary(new, None), "ready without fences"
                assert p.db.primary_epoch != new
        finally:
            await su.execute("ALTER DATABASE mes WITH ALLOW_CONNECTIONS true")
    assert await p.db.become_primary(new, None)
    async with await c.connect("a") as conn:
        for process in ("held", "never-claimed"):
            with pytest.raises(StaleEpoch):
                await ProcessContext(conn, process, old).start()


@pytest.mark.parametrize("peers", [{"b", "c"}, {"c"}], ids=["b-streams", "b-agent-gone"])
async def test_a_standby_joining_a_quorum_is_recorded_before_a_commit_may_be_on_it_alone(
    b_then_c: Primary, monkeypatch: pytest.MonkeyPatch, peers: set[str]
) -> None:
    """b recorded, c starts streaming: a names ``ANY 1 (b, c)``, or c alone when b's
    agent is gone (b no longer counts as streaming). Right then (the round between the
    setting and the record), b stops receiving and 50 commits are acknowledged by c
    alone. Were a to die at that moment, every standby the record lets take over must
    hold them."""
    p = b_then_c
    c = p.cluster
    await follow(c, "c")
    mgr = c.mgr["a"]
    real = mgr.restore_sync
    seen: list[str] = []

    async def and_commit_through_c_alone(names: Sequence[str]) -> list[str]:
        out = await real(names)
        if "c" in names and not seen:
            async with stalled_walsender(c.address("a"), c.port, "b"):
                await insert(c, range(1, 51))
                record, lsns = await p.record(), await received(c, ["b", "c"])
                try:  # checked while b still receives nothing
                    may = await on_every_eligible_standby(p, record, lsns, set(range(1, 51)))
                    seen.append("ok" if may else "nobody may take over")
                except AssertionError as err:
                    seen.append(str(err))
        return out

    monkeypatch.setattr(mgr, "restore_sync", and_commit_through_c_alone)

    async def named_c() -> bool:
        return bool(seen)

    await p.rounds_until(peers, named_c, "c named synchronous")
    assert seen == ["ok"], seen[0]


async def test_a_quorum_shrinks_only_once_the_remaining_standby_has_every_commit(
    quorum: Primary,
) -> None:
    """``ANY 1 (b, c)``, both recorded. c stops receiving (its walsender frozen, still
    connected) while 100 commits are acknowledged by b alone; then b crashes. c must not
    be recorded alone before it has those commits; once it receives again it is."""
    p = quorum
    c = p.cluster
    ids = set(range(1, 101))
    async with stalled_walsender(c.address("a"), c.port, "c"):
        await insert(c, range(1, 101))
        c.crash("b")
        for _ in range(6):
            await p.round({"c"})
            record = await p.record()
            assert record is not None
            lsns = await received(c, ["b", "c"])
            lacking = ids - await ids_on(c, "c")
            may = [n for n in ("b", "c") if eligible(c.config, record, n, "a", lsns)]
            assert not ("c" in may and lacking), (
                f"c may take over (record {record.sync}) but lacks {len(lacking)} of the "
                "100 commits acknowledged by b alone"
            )

    async def c_alone() -> bool:
        st = await p.record()
        return st is not None and st.sync == ["c"]

    await p.rounds_until({"c"}, c_alone, "c recorded alone once it caught up")
    assert ids <= await ids_on(c, "c")


async def test_the_primary_names_no_new_standby_while_the_record_cannot_take_it_in(
    b_then_c: Primary,
) -> None:
    """b recorded, c starts streaming, but the term ended in etcd (the guard of every
    record write fails): c can never be recorded, so the primary must not start to
    wait for it, or a commit could be on c alone while the record names b only."""
    p = b_then_c
    c = p.cluster
    await follow(c, "c")
    names = await p.sync_names()
    await p.store.delete(keys.leader(c.pair.name))
    for _ in range(5):
        await p.round({"b", "c"})
    assert await p.sync_names() == names, "c named though the record could not name it"
    record = await p.record()
    assert record is not None and record.sync == ["b"]
