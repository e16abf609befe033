"""The watchdog fences the active's PostgreSQL whenever it may be primary: real agents,
real servers.

A postmaster killed on the active is started again by its agent with a new PID. If that
agent then freezes, its watchdog must kill the *new* postmaster, or a standby promotes
next to a primary that still accepts connections. The same for a standby frozen in the
middle of its promotion: the server may take writes before its agent knows it does.
A standby that was never promoted is never killed, however long its agent is frozen.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_database_failover import (
    ADDRESSES,
    db_cluster,
    inserted,
    more_commits,
    postmaster,
    ready,
    sync_state,
)
from tests.integration.test_database_failover import steady_writer as steady_writer
from tests.integration.test_fence_services import dead, stopped
from tests.support.cluster import Cluster, pid_alive, until
from tests.support.pg_harness import PASSWORDS, needs_postgres

pytestmark = [pytest.mark.e2e, needs_postgres]
__all__ = ["db_cluster"]  # the fixture, used by name


async def test_a_postgresql_restarted_in_place_is_killed_when_its_agent_freezes(
    db_cluster: tuple[Cluster, int],
) -> None:
    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 50)
    old = await postmaster(c, "a")
    os.kill(old, signal.SIGKILL)  # the postmaster only; the agent repairs it in place

    async def restarted() -> int | None:
        pid = await postmaster(c, "a")
        return pid if pid != old and pid_alive(pid) else None

    new = await until(restarted, 30, "a's PostgreSQL restarted in place with a new PID")
    await more_commits(writer, 20, 30, "commits on the restarted primary")
    await writer.stop()
    assert await c.leader("p") == ("a", epoch), "a PostgreSQL crash alone must not move the pair"

    async def b_sync_again() -> bool:  # the restart may have degraded the pair meanwhile
        st = await sync_state(c)
        return st is not None and st.primary == "a" and st.sync == ["b"]

    await until(b_sync_again, 60, "b recorded as the synchronous standby again")

    c.signal("a", signal.SIGSTOP)  # the agent freezes: only its watchdog can fence now
    try:
        # Liveness bound: the watchdog acts at the fence point plus half the margin (1.75 s
        # after the last acknowledged keepalive was sent by default).
        await until(lambda: dead(new), 10, f"the restarted postmaster {new} killed")
        await c.active("p", not_epoch=epoch, node="b", timeout=30)
        info = f"host=127.0.0.1 port={port} dbname=mes user=mes password={PASSWORDS['mes']}"
        with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused|no such file"):
            async with asyncio.timeout(5):
                async with await psycopg.AsyncConnection.connect(
                    info, autocommit=True, connect_timeout=2
                ) as conn:
                    await conn.execute("INSERT INTO ticks (id) VALUES (-1)")
    finally:
        c.signal("a", signal.SIGCONT)
    await until(lambda: inserted(port, -2), 30, "a write on b")


async def test_a_postgresql_restarted_in_place_is_killed_before_its_agent_knows_its_pid(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent freezes right after it restarted its primary in place, before it has
    handed the new PID to anyone (a test hook stops it there): the watchdog finds the
    new postmaster through the data directory."""
    monkeypatch.setenv("HAPAIR_TEST_STOP_ON_NEW_POSTMASTER", "1")
    c, port = db_cluster
    await ready(c, port)
    old = await postmaster(c, "a")
    agent = c.agents["a"].pid
    os.kill(old, signal.SIGKILL)
    try:
        await until(lambda: asyncio.sleep(0, stopped(agent)), 30, "a stopped by its hook")
        data = c.tmp / "p" / "a" / "pg"
        new = int((data / "postmaster.pid").read_text().split()[0])
        assert new != old
        await until(lambda: dead(new), 10, f"the restarted postmaster {new} killed")
    finally:
        c.signal("a", signal.SIGCONT)


def data_dir(c: Cluster, node: str) -> Path:
    return c.tmp / "p" / node / "pg"


def serving(c: Cluster, node: str) -> int:
    """The postmaster serving ``node``'s data directory (read directly: an agent frozen
    does not publish)."""
    return int((data_dir(c, node) / "postmaster.pid").read_text().split()[0])


async def local_write(port: int, host: str, row: int) -> str:
    """Whether the server at ``host`` commits a write, as a client asking for no more
    than a local flush would see it: 'written', or the error."""
    info = f"host={host} port={port} dbname=mes user=mes password={PASSWORDS['mes']}"
    try:
        async with asyncio.timeout(5):
            async with await psycopg.AsyncConnection.connect(
                info, autocommit=True, connect_timeout=2
            ) as conn:
                await conn.execute("SET synchronous_commit = local")
                await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (row,))
    except (psycopg.Error, TimeoutError) as err:
        return repr(err)
    return "written"


async def test_a_standby_frozen_right_after_its_promotion_is_killed_by_its_watchdog(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """a crashes; b takes the pair over and freezes right after PostgreSQL took its
    promotion, before b saw it writable (a test hook stops it there). b's lease expires
    and a, restarted, takes the pair back: b's promoted server must have been killed by
    then, or the pair has two primaries."""
    monkeypatch.setenv("HAPAIR_TEST_STOP_AFTER_PROMOTE", "1")
    c, port = db_cluster
    _, epoch = await ready(c, port)  # a initialises its cluster: no promotion there
    monkeypatch.delenv("HAPAIR_TEST_STOP_AFTER_PROMOTE")
    agent = c.agents["b"].pid
    c.crash("a")
    await until(lambda: asyncio.sleep(0, stopped(agent)), 60, "b stopped by its hook")
    promoted = serving(c, "b")
    leader = await c.leader("p")
    assert leader is not None and leader[0] == "b" and leader[1] != epoch
    try:
        # b's lease expires once its keepalives stopped: well past its fence point.
        await until(lambda: _not_leader(c, leader), 30, "b's lease expired")
        c.start("a")
        await c.active("p", not_epoch=leader[1], node="a", timeout=60)
        # A liveness bound: the watchdog acts at b's fence point plus half the margin,
        # before b's lease could expire, so before a could even campaign.
        try:
            await until(lambda: dead(promoted), 10, f"b's promoted postmaster {promoted} killed")
        except AssertionError as err:
            wrote = await local_write(port, ADDRESSES[1], -5)
            raise AssertionError(f"{err}; a write on b with a primary on a: {wrote}") from err
    finally:
        c.signal("b", signal.SIGCONT)


async def _not_leader(c: Cluster, leader: tuple[str, int]) -> bool:
    return await c.leader("p") != leader


async def test_a_frozen_standby_keeps_its_postgresql(db_cluster: tuple[Cluster, int]) -> None:
    """Every agent's watchdog has a deadline, a standby's too; but a standby's watchdog
    knows nothing of its PostgreSQL, so a standby frozen past its lease keeps its server
    and follows again once resumed."""
    c, port = db_cluster
    _, epoch = await ready(c, port)
    standby = serving(c, "b")
    c.signal("b", signal.SIGSTOP)
    try:

        async def b_gone() -> bool:  # its status is bound to its lease: expired
            return await c.status("b") is None

        await until(b_gone, 30, "b's lease expired")
        assert pid_alive(standby), "b's standby server was killed"
    finally:
        c.signal("b", signal.SIGCONT)
    await until(lambda: inserted(port, -6), 30, "a write on a")
    assert await c.leader("p") == ("a", epoch)
    assert pid_alive(standby), "b's standby server was killed"
