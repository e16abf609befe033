"""The watchdog fences a PostgreSQL that was restarted in place: real agents, real server.

A postmaster killed on the active is started again by its agent with a new PID. If that
agent then freezes, its watchdog must kill the *new* postmaster, or a standby promotes
next to a primary that still accepts connections.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psycopg
import pytest
from cluster import Cluster, pid_alive, until
from pg_harness import PASSWORDS, needs_postgres
from test_database_failover import (
    db_cluster,
    inserted,
    more_commits,
    postmaster,
    ready,
    sync_state,
)
from test_database_failover import steady_writer as steady_writer
from test_fence_services import dead, stopped

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
