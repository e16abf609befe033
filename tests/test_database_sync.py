"""The sync record, the primary's own setting and the process fences, kept in order by
the agent's database care (``workshop_agent.database.Database``): real PostgreSQL, real
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from harness import Etcd
from pg_harness import PgCluster, ids_on, needs_postgres, primary_with_standbys, running_cluster
from pg_harness import until as pg_until

from shared import keys
from shared.log import EventLog
from shared.process_context import ProcessContext, StaleEpoch
from shared.records import SyncState, decode
from shared.store import Store
from workshop_agent.database import Database
from workshop_agent.election import Election
from workshop_agent.pg import query as q
from workshop_agent.pg.proc import children

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


@pytest.fixture
async def primary(etcd: Etcd, store: Store) -> AsyncIterator[Primary]:
    async with running_cluster(2) as cluster:
        await primary_with_standbys(cluster)
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

        async def b_recorded() -> bool:
            st = await p.record()
            return st is not None and st.sync == ["b"]

        await p.rounds_until({"b"}, b_recorded, "b recorded synchronous")
        yield p


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
