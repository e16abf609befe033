"""Real PostgreSQL 15 nodes driven by PgManager: replication, failover, rejoin, degrade.

Every scenario runs a writer that commits numbered rows as fast as it can through the
libpq multi-host string; after each event, every row whose commit was acknowledged
must be on the new primary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from hapair.workshop_agent.pg import query as q
from hapair.workshop_agent.pg.errors import PgError, SecretError
from hapair.workshop_agent.pg.manager import PgManager, Timeouts
from hapair.workshop_agent.pg.proc import children, process_state
from tests.support.pg_harness import (
    PASSWORDS,
    PgCluster,
    Writer,
    ids_on,
    make_cluster,
    needs_postgres,
    primary_with_standbys,
    running_cluster,
    streaming,
    until,
)

pytestmark = needs_postgres


@pytest.fixture
async def pg2() -> AsyncIterator[PgCluster]:
    async with running_cluster(2) as cluster:
        await primary_with_standbys(cluster)
        yield cluster


@pytest.fixture
async def pg3() -> AsyncIterator[PgCluster]:
    async with running_cluster(3) as cluster:
        await primary_with_standbys(cluster)
        yield cluster


async def assert_nothing_lost(cluster: PgCluster, writer: Writer, on: str) -> None:
    await writer.stop()
    assert writer.acked, "the writer never got a commit through"
    missing = set(writer.acked) - await ids_on(cluster, on)
    assert not missing, f"{len(missing)} acknowledged rows missing on {on}: {sorted(missing)[:10]}"


async def commits_on(cluster: PgCluster, name: str, writer: Writer) -> None:
    """The writer gets a commit acknowledged by ``name`` from now on."""
    await writer.acked_after(time.monotonic(), cluster.address(name))


async def test_init_clone_sync_and_idempotence() -> None:
    async with running_cluster(2) as c:
        a, b = c.mgr["a"], c.mgr["b"]
        with pytest.raises(PgError, match="not the main node"):
            await b.ensure_primary(1)  # a secondary never initialises a cluster of its own
        assert (await a.ensure_primary(1)).action == "initialised"
        assert (await b.ensure_standby(c.address("a"))).action == "cloned"
        await until(lambda: streaming(c, "b"), 15, "b streaming")
        assert await a.restore_sync(["b"]) == ["b"]
        assert (await a.ensure_primary(1)).action == "none"
        assert (await b.ensure_standby(c.address("a"))).action == "none"

        primary, standby = await a.status(), await b.status()
        assert primary.role == "primary" and primary.timeline == 1
        assert primary.synchronous_standby_names == '"b"' and primary.sync_standbys() == ["b"]
        assert (
            standby.role == "standby" and standby.streaming and standby.upstream == c.address("a")
        )
        assert standby.model_dump(mode="json")["replay_lsn"].count("/") == 1

        # The database and its owner exist; the owner's writes reach the standby.
        async with await c.connect("a") as conn:
            await conn.execute("CREATE TABLE t (x int)")
            await conn.execute("INSERT INTO t VALUES (42)")
        async with await c.connect("b") as conn:
            assert await (await conn.execute("SELECT x FROM t")).fetchall() == [(42,)]

        # Authentication: a wrong password, and the socket for anyone but os_user, fail.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await psycopg.AsyncConnection.connect(
                host=c.address("a"), port=c.port, user="mes", password="wrong", dbname="mes"
            )
        with pytest.raises(
            psycopg.OperationalError, match=r"Peer authentication failed|no pg_ident"
        ):
            await psycopg.AsyncConnection.connect(
                host=str(a.layout.run_dir), port=c.port, user="postgres", dbname="postgres"
            )


async def test_crash_promote_loses_nothing_then_rewind_and_switch_back(pg2: PgCluster) -> None:
    c = pg2
    writer = Writer(c.multi_host()).start()
    await commits_on(c, "a", writer)
    crashed_at = time.monotonic()
    c.crash("a")
    result = await c.mgr["b"].ensure_primary(2)
    assert result.action == "promoted", result
    first = await writer.acked_after(crashed_at, c.address("b"))
    print(f"crash -> first commit on b: {first - crashed_at:.3f} s ({result})")
    await assert_nothing_lost(c, writer, "b")

    # The old primary wrote past the promotion point: it rejoins through pg_rewind.
    rejoin = await c.mgr["a"].ensure_standby(c.address("b"))
    assert rejoin.action == "rewound", rejoin
    await until(lambda: streaming(c, "a"), 15, "a streaming from b")
    assert await c.mgr["b"].restore_sync(["a"]) == ["a"]

    # Then a planned switchover back to it loses nothing either.
    writer = Writer(c.multi_host(), first_id=10_000_000).start()
    await commits_on(c, "b", writer)
    lsn = await c.mgr["b"].switchover_prepare()
    assert await c.mgr["a"].caught_up(lsn, timeout_s=5)
    assert (await c.mgr["a"].ensure_primary(3)).action == "promoted"
    await commits_on(c, "a", writer)
    assert (await c.mgr["b"].ensure_standby(c.address("a"))).action == "started"
    await until(lambda: streaming(c, "b"), 15, "b streaming from a")
    await assert_nothing_lost(c, writer, "a")
    assert (await c.mgr["a"].status()).timeline == 3


async def test_switchover_needs_no_rewind_and_loses_nothing(pg2: PgCluster) -> None:
    c = pg2
    writer = Writer(c.multi_host()).start()
    await commits_on(c, "a", writer)
    began = time.monotonic()
    lsn = await c.mgr["a"].switchover_prepare()
    assert (await c.mgr["a"].status()).role == "stopped"
    assert await c.mgr["b"].caught_up(lsn)  # the first look already sees it replayed
    assert (await c.mgr["b"].ensure_primary(2)).action == "promoted"
    first = await writer.acked_after(began, c.address("b"))
    print(f"switchover -> first commit on b: {first - began:.3f} s")
    rejoin = await c.mgr["a"].ensure_standby(c.address("b"))
    assert rejoin.action == "started", rejoin  # no rewind: b replayed everything a wrote
    await until(lambda: streaming(c, "a"), 15, "a streaming from b")
    assert await c.mgr["b"].restore_sync(["a"]) == ["a"]
    await commits_on(c, "b", writer)
    await assert_nothing_lost(c, writer, "b")


async def test_postgres_crash_restarts_in_place_still_synchronous(pg2: PgCluster) -> None:
    c = pg2
    writer = Writer(c.multi_host()).start()
    await commits_on(c, "a", writer)
    c.crash("a")
    result = await c.mgr["a"].ensure_primary(1)
    assert result.action == "started", result  # restarted in place, crash recovery
    status = await c.mgr["a"].status()
    assert status.synchronous_standby_names == '"b"'  # kept: b still has every commit
    await until(lambda: streaming(c, "b"), 15, "b streaming again")
    await commits_on(c, "a", writer)
    await assert_nothing_lost(c, writer, "a")
    assert (await c.mgr["a"].status()).sync_standbys() == ["b"]


async def test_standby_gone_writes_block_until_degraded_then_sync_again(pg2: PgCluster) -> None:
    c = pg2
    writer = Writer(c.multi_host()).start()
    await commits_on(c, "a", writer)
    assert (await c.mgr["b"].demote()).action == "stopped"
    await asyncio.sleep(0.3)
    stalled_at = time.monotonic()
    await asyncio.sleep(0.3)
    assert writer.first_ack_after(stalled_at, c.address("a")) is None, "a commit did not wait"

    degraded = await c.mgr["a"].degrade_to_async()
    assert degraded.action == "degraded"
    await commits_on(c, "a", writer)  # writes go on
    assert (await c.mgr["a"].status()).synchronous_standby_names == ""

    assert (await c.mgr["b"].ensure_standby(c.address("a"))).action == "started"
    await until(lambda: streaming(c, "b"), 15, "b streaming again")
    assert await c.mgr["a"].restore_sync(["b"]) == ["b"]
    await commits_on(c, "a", writer)
    await assert_nothing_lost(c, writer, "a")


async def test_demote_is_quick_even_with_commits_waiting(pg2: PgCluster) -> None:
    c = pg2
    await c.mgr["b"].demote()
    writer = Writer(c.multi_host()).start()  # its first commit waits for b forever
    await asyncio.sleep(0.2)
    began = time.monotonic()
    result = await c.mgr["a"].demote()
    took = time.monotonic() - began
    assert result.action == "stopped" and took < 2.0, result
    assert c.mgr["a"].postmaster_pid() is None
    await writer.stop()


async def test_a_frozen_server_is_reported_within_budget_and_stopped() -> None:
    async with running_cluster(2, timeouts=Timeouts(query_s=0.5, demote_fast_s=1.0)) as c:
        await primary_with_standbys(c)
        a = c.mgr["a"]
        assert (await a.status()).role == "primary"  # the agent's connection is now open
        pid = a.postmaster_pid()
        assert pid is not None
        frozen = [pid, *children(pid)]
        for member in frozen:
            os.kill(member, signal.SIGSTOP)
        for _ in range(2):  # once on the open connection, once connecting anew
            began = time.monotonic()
            status = await a.status()
            assert status.role == "unreachable" and time.monotonic() - began < 1.0, status
        result = await a.demote()  # resumes it so that it obeys the fast shutdown
        assert result.action == "stopped" and result.took_s < 3.0, result
        assert a.postmaster_pid() is None
        # A process that exited may linger a moment as a zombie until its parent reaps
        # it: dead all the same, it serves nothing.
        states = {p: process_state(p) for p in frozen}
        assert all(state != "running" for state in states.values()), states


async def test_three_nodes_quorum_failover_to_the_most_advanced(pg3: PgCluster) -> None:
    c = pg3
    a = await c.mgr["a"].status()
    assert a.synchronous_standby_names == 'ANY 1 ("b", "c")'
    assert sorted(r.sync_state for r in a.replicas) == ["quorum", "quorum"]
    writer = Writer(c.multi_host()).start()
    await commits_on(c, "a", writer)
    c.crash("a")
    # Ask every standby; promote the one that received the most.
    statuses = {n: await c.mgr[n].status() for n in ("b", "c")}
    best = max(statuses, key=lambda n: statuses[n].receive_lsn or 0)
    other = "c" if best == "b" else "b"
    assert (await c.mgr[best].ensure_primary(2)).action == "promoted"
    await commits_on(c, best, writer)
    await assert_nothing_lost(c, writer, best)

    # The other standby follows the new primary live, across the timeline switch.
    assert (await c.mgr[other].ensure_standby(c.address(best))).action == "repointed"

    async def on_timeline_2() -> bool:
        status = await c.mgr[other].status()
        return status.streaming and status.timeline == 2

    await until(on_timeline_2, 15, f"{other} streaming from {best} on timeline 2")
    assert (await c.mgr["a"].ensure_standby(c.address(best))).action == "rewound"
    await until(lambda: streaming(c, "a"), 15, "a streaming")
    assert sorted(await c.mgr[best].restore_sync([other, "a"])) == sorted([other, "a"])


async def test_a_standby_that_received_more_than_the_new_primary_is_rewound(
    pg3: PgCluster,
) -> None:
    c = pg3
    await c.mgr["b"].ensure_primary(2)  # while a still runs, and c still streams from a
    async with await c.connect("a") as conn:  # a goes on: c receives WAL b never had
        for i in range(50):
            await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (i,))
    # As if an agent had repointed c and died: c follows b and waits there in vain.
    cm = c.mgr["c"]
    conn = await cm.pg.local()
    await q.set_primary_conninfo(conn, cm.pg.conninfo(c.address("b")))
    result = await cm.ensure_standby(c.address("b"))
    assert result.action == "rewound", result
    await until(lambda: streaming(c, "c"), 15, "c streaming from b")
    assert not await ids_on(c, "c")  # the rows only a had are gone from c
    result = await c.mgr["a"].ensure_standby(c.address("b"))  # the stale primary too
    assert result.action == "rewound", result
    await until(lambda: streaming(c, "a"), 15, "a streaming from b")


async def test_unrewindable_data_dir_is_cloned_afresh(pg2: PgCluster) -> None:
    c = pg2
    c.crash("a")
    await c.mgr["b"].ensure_primary(2)
    a = c.mgr["a"]
    (a.layout.data_dir / "global" / "pg_control").unlink()  # beyond pg_rewind's help
    result = await a.ensure_standby(c.address("b"))
    assert result.action == "recloned", result
    assert (a.layout.retired / "PG_VERSION").exists()  # the old one is kept aside
    await until(lambda: streaming(c, "a"), 15, "a streaming")


async def test_missing_password_file_fails_before_anything_starts() -> None:
    cluster = make_cluster(2)
    try:
        os.unlink(cluster.config.auth.replication_password_file)
        with pytest.raises(SecretError) as info:
            PgManager.open(cluster.config, cluster.pair, cluster.pair.nodes[0])
        assert cluster.config.auth.replication_password_file in str(info.value)
        assert "database.auth.replication_password_file" in str(info.value)
        assert not cluster.mgr["a"].layout.data_dir.exists()
        assert PASSWORDS["replication"] not in str(info.value)
    finally:
        cluster.cleanup()
