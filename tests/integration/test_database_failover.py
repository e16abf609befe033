"""The agents run the pair's PostgreSQL: real agents, real PostgreSQL, real crashes.

A writer commits numbered rows as a client would (libpq multi-host string with
target_session_attrs=read-write); after every failover each acknowledged row must be on
the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hapair.shared import keys
from hapair.shared.records import Resource, ResourceReport, SyncState, decode
from hapair.workshop_agent.step_down import REFUSED_S
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import Etcd, free_port
from tests.support.pg_harness import (
    PASSWORDS,
    Writer,
    common_free_port,
    database_section,
    needs_postgres,
    stalled_walsender,
)
from tests.support.pg_harness import write_secrets as write_pg_secrets

pytestmark = [pytest.mark.e2e, needs_postgres]
# PostgreSQL sees every loopback client as 127.0.0.1, so the nodes use .1 and .2.
ADDRESSES = ("127.0.0.1", "127.0.0.2")
THREE = (*ADDRESSES, "127.0.0.3")


@pytest.fixture
async def db_cluster(etcd: Etcd, store: object) -> AsyncIterator[tuple[Cluster, int]]:
    async for cluster in _db_cluster(etcd, ADDRESSES):
        yield cluster


@pytest.fixture
async def db_cluster3(etcd: Etcd, store: object) -> AsyncIterator[tuple[Cluster, int]]:
    async for cluster in _db_cluster(etcd, THREE):
        yield cluster


@pytest.fixture
async def db_cluster_held(etcd: Etcd, store: object) -> AsyncIterator[tuple[Cluster, int]]:
    """Two nodes with a database and a service held after an unplanned failover."""
    async for cluster in _db_cluster(etcd, ADDRESSES, held=True):
        yield cluster


async def _db_cluster(
    etcd: Etcd, addresses: tuple[str, ...], held: bool = False, **pair: Any
) -> AsyncIterator[tuple[Cluster, int]]:
    """``pair``: more of the pair's settings (a failover section, a network section)."""
    root = Path(tempfile.mkdtemp(prefix="hapair-dbtest-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user below this directory
    write_pg_secrets(root)
    port = common_free_port(addresses)
    c = Cluster(etcd, root)
    site = c.site(
        [
            {
                "name": "p",
                "nodes": [
                    {"name": n, "address": a} for n, a in zip("abc", addresses, strict=False)
                ],
                "database": database_section(root, port, synchronous=True),
                "services": (
                    [recording_service("batch", free_port(), c.record, hold_until_ack=True)]
                    if held
                    else []
                ),
                **pair,
            }
        ]
    )
    await c.apply(site)
    try:
        yield c, port
    finally:
        await c.stop_all()
        if not os.environ.get("HAPAIR_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


def conninfo(port: int, addresses: tuple[str, ...] = ADDRESSES) -> str:
    hosts = ",".join(addresses)
    return (
        f"host={hosts} port={port} dbname=mes user=mes password={PASSWORDS['mes']} "
        "target_session_attrs=read-write connect_timeout=2"
    )


async def sync_state(c: Cluster) -> SyncState | None:
    kv = await c.store.get(keys.sync_standby("p"))
    return None if kv is None else decode(SyncState, kv.value, kv.key)


async def ready(c: Cluster, port: int) -> tuple[str, int]:
    """a primary, b its recorded synchronous standby, a table to write to."""
    c.start("a")
    node, epoch = await c.active("p", node="a", timeout=60)
    c.start("b")

    async def b_sync() -> bool:
        st = await sync_state(c)
        return st is not None and st.primary == "a" and st.sync == ["b"]

    await until(b_sync, 60, "b recorded as the synchronous standby")
    async with await psycopg.AsyncConnection.connect(conninfo(port), autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
    return node, epoch


async def rows_on(port: int, host: str) -> set[int]:
    info = f"host={host} port={port} dbname=mes user=mes password={PASSWORDS['mes']}"
    async with await psycopg.AsyncConnection.connect(info) as conn:
        cur = await conn.execute("SELECT id FROM ticks")
        return {int(r[0]) for r in await cur.fetchall()}


async def endpoint_on(c: Cluster, node: str, epoch: int) -> Any:
    async def moved() -> Any:
        e = await c.endpoint("p.db")
        return e if e is not None and e.node == node and e.epoch > epoch else None

    return await until(moved, 30, f"p.db published by {node}")


async def test_crash_of_the_active_loses_no_acknowledged_commit(
    db_cluster: tuple[Cluster, int],
) -> None:
    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 200)
    c.crash("a")  # the agent, its watchdog and PostgreSQL die at the same instant
    await c.active("p", not_epoch=epoch, node="b", timeout=30)
    await b_primary_with_every_commit(c, port, epoch, writer)


async def b_primary_with_every_commit(c: Cluster, port: int, epoch: int, writer: Writer) -> None:
    """After a's crash: b publishes the database and takes commits, every commit a
    acknowledged is on b, and b is the recorded primary."""
    endpoint = await endpoint_on(c, "b", epoch)
    assert (endpoint.host, endpoint.port, endpoint.protocol) == ("127.0.0.2", port, "postgresql")
    await more_commits(writer, 50, 30, "commits on b")
    await writer.stop()
    lost = set(writer.acked) - await rows_on(port, "127.0.0.2")
    assert not lost, f"{len(lost)} acknowledged commits lost"
    st = await sync_state(c)
    assert st is not None and st.primary == "b"


async def test_planned_switchover_loses_nothing_and_the_old_primary_follows(
    db_cluster: tuple[Cluster, int],
) -> None:
    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 200)
    await switch_over_to(c, "b")
    await c.active("p", not_epoch=epoch, node="b", timeout=30)
    await endpoint_on(c, "b", epoch)

    async def a_sync() -> bool:
        st = await sync_state(c)
        return st is not None and st.primary == "b" and st.sync == ["a"]

    await until(a_sync, 60, "the old primary back as the synchronous standby")
    await more_commits(writer, 50, 30, "commits on b")
    await writer.stop()
    assert not set(writer.acked) - await rows_on(port, "127.0.0.2")

    async def replayed_on_a() -> bool:  # flushed there at commit, replayed soon after
        return not set(writer.acked) - await rows_on(port, "127.0.0.1")

    await until(replayed_on_a, 10, "every acknowledged row on the old primary too")


async def stop_b_until_degraded(c: Cluster) -> None:
    """b's agent stops, and its database with it; a goes asynchronous, recorded so."""
    import signal

    c.signal("b", signal.SIGTERM)
    c.agents["b"].wait(15)

    async def degraded() -> bool:
        st = await sync_state(c)
        return st is not None and st.degraded and st.sync == []

    await until(degraded, 15, "a recorded as degraded, no synchronous standby")


async def postmaster(c: Cluster, node: str) -> int:
    st = await c.status(node)
    pid = (st.database or {}).get("pid") if st else None
    assert isinstance(pid, int), f"no PostgreSQL pid in {node}'s status"
    return pid


async def inserted(port: int, row: int) -> bool:
    """One row written through the multi-host string (raises while nobody accepts it)."""
    async with await psycopg.AsyncConnection.connect(conninfo(port), autocommit=True) as conn:
        await conn.execute("INSERT INTO ticks (id) VALUES (%s) ON CONFLICT DO NOTHING", (row,))
    return True


async def _acked(writer: Writer, n: int) -> bool:
    return len(writer.acked) >= n


async def steady_writer(port: int, n: int, addresses: tuple[str, ...] = ADDRESSES) -> Writer:
    """A writer committing as fast as it can, once ``n`` commits were acknowledged."""
    writer = Writer(conninfo(port, addresses)).start()
    await until(lambda: _acked(writer, n), 30, f"{n} acknowledged commits")
    return writer


async def more_commits(writer: Writer, n: int, timeout: float, what: str) -> None:
    """Wait for ``n`` more acknowledged commits (the target fixed now, not re-read)."""
    target = len(writer.acked) + n
    await until(lambda: _acked(writer, target), timeout, what)


# Errors by which a server refuses a write (connection gone or refused, shutting down,
# read-only); any other error (a wrong password, a missing table) proves nothing.
REFUSALS = {None, "57P01", "57P02", "57P03", "25006", "08000", "08001", "08003", "08006"}


class DirectWriter:
    """Inserts numbered rows into one server only, as a client pinned to the old primary
    would; keeps when each insert was acknowledged, and each error's SQLSTATE."""

    def __init__(self, port: int, host: str) -> None:
        self.info = (
            f"host={host} port={port} dbname=mes user=mes password={PASSWORDS['mes']}"
            " connect_timeout=2"
        )
        self.acked: list[tuple[float, int]] = []
        self.refused = 0
        self.other: list[str] = []
        self._task: Any = None

    def start(self) -> DirectWriter:
        import asyncio

        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        import asyncio
        import contextlib

        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        import asyncio
        import time

        n = 1_000_000
        conn: psycopg.AsyncConnection[Any] | None = None
        while True:
            try:
                if conn is None:
                    conn = await psycopg.AsyncConnection.connect(self.info, autocommit=True)
                n += 1
                await conn.execute("INSERT INTO ticks (id) VALUES (%s)", (n,))
                self.acked.append((time.monotonic(), n))
            except psycopg.Error as err:
                if err.sqlstate in REFUSALS:
                    self.refused += 1
                else:
                    self.other.append(f"{err.sqlstate}: {err}")
                if conn is not None:
                    await conn.close()
                conn = None
                await asyncio.sleep(0.005)


@pytest.mark.long
async def test_a_frozen_primary_accepts_no_write_once_the_standby_took_over(
    db_cluster: tuple[Cluster, int],
) -> None:
    """A writer pinned to a runs before, through and after a's agent freezing and b's
    takeover: a acknowledges nothing once b holds the pair, every write a did
    acknowledge is on b, and each failure is a refusal, not some other error."""
    import signal
    import time

    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = DirectWriter(port, "127.0.0.1").start()

    async def writing() -> bool:
        return len(writer.acked) >= 100

    await until(writing, 30, "writes acknowledged by a")
    c.signal("a", signal.SIGSTOP)

    async def b_leads() -> float | None:
        lead = await c.leader("p")
        return time.monotonic() if lead is not None and lead[0] == "b" else None

    took_over = await until(b_leads, 30, "b holding the pair", step=0.005)
    await c.active("p", not_epoch=epoch, node="b", timeout=30)
    await endpoint_on(c, "b", epoch)
    seen = writer.refused

    async def refused_more() -> bool:  # the writer kept trying on a after the takeover
        return writer.refused >= seen + 20

    await until(refused_more, 30, "writes to a refused after the takeover")
    await writer.stop()
    c.signal("a", signal.SIGCONT)
    late = [n for at, n in writer.acked if at > took_over]
    assert not late, f"a acknowledged {len(late)} writes after b took over"
    assert not writer.other, f"errors that are no refusal: {writer.other[:3]}"
    assert not {n for _, n in writer.acked} - await rows_on(port, "127.0.0.2")

    async def a_follows() -> bool:
        st = await c.status("a")
        db = st.database if st else None
        return bool(db and db.get("role") == "standby" and db.get("streaming"))

    await until(a_follows, 60, "the old primary rejoined as a streaming standby")


@pytest.mark.long
async def test_standby_gone_degrades_to_async_after_its_delay_then_recovers(
    db_cluster: tuple[Cluster, int],
) -> None:
    import signal
    import time

    c, port = db_cluster
    await ready(c, port)
    writer = await steady_writer(port, 100)
    c.signal("b", signal.SIGTERM)  # its agent stops, and its database with it
    c.agents["b"].wait(15)
    stopped_at = time.monotonic()

    async def degraded() -> bool:
        st = await sync_state(c)
        return st is not None and st.degraded and st.sync == []

    await until(degraded, 15, "the primary recorded as degraded, no synchronous standby")
    await more_commits(writer, 50, 15, "commits going on without the standby")
    times = [at for at, _ in writer.acked_at]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > stopped_at - 1]
    # degrade_after_s is 1 s here; the monitor looks every 0.5 s.
    assert max(gaps) < 1.0 + 1.5, f"writes blocked {max(gaps):.2f}s"
    c.start("b")

    async def b_sync_again() -> bool:
        st = await sync_state(c)
        return st is not None and st.sync == ["b"] and not st.degraded

    await until(b_sync_again, 60, "b caught up and recorded synchronous again")
    await writer.stop()
    assert not set(writer.acked) - await rows_on(port, "127.0.0.1")


@pytest.mark.long
async def test_status_shows_each_database_role_and_sync_state(
    db_cluster: tuple[Cluster, int],
) -> None:
    import asyncio
    import sys

    c, port = db_cluster
    await ready(c, port)

    async def shown() -> str | None:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "hapair"),
            "status",
            *c.etcd.client_args(),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"},
        )
        out, _ = await proc.communicate()
        text = out.decode()
        return text if "postgresql primary" in text and "postgresql standby" in text else None

    text = await until(shown, 20, "both databases in hapair status")
    assert "p.db postgresql://127.0.0.1" in text

    async def synchronous_shown() -> str | None:
        text = await shown()
        return text if text and "sync: b" in text and "NOT STREAMING" not in text else None

    await until(synchronous_shown, 20, "b shown as streaming, synchronous standby")


async def quorum_ready(c: Cluster, port: int) -> int:
    """a primary, b and c its recorded quorum standbys (``ANY 1 (b, c)``), a table to
    write to: a's epoch."""
    c.start("a")
    _, epoch = await c.active("p", node="a", timeout=60)
    c.start("b")
    c.start("c")

    async def quorum() -> bool:
        st = await sync_state(c)
        return st is not None and st.primary == "a" and sorted(st.sync) == ["b", "c"]

    await until(quorum, 60, "b and c recorded as the quorum standbys")
    async with await psycopg.AsyncConnection.connect(conninfo(port), autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS ticks (id bigint PRIMARY KEY)")
    return epoch


async def test_three_nodes_quorum_commit_and_the_most_advanced_standby_takes_over(
    db_cluster3: tuple[Cluster, int],
) -> None:
    c, port = db_cluster3
    epoch = await quorum_ready(c, port)
    # Every node's address: either standby may be the one that takes over.
    writer = await steady_writer(port, 200, THREE)
    c.crash("a")
    await c.active("p", not_epoch=epoch, timeout=30)
    await more_commits(writer, 50, 60, "commits on the new primary")
    await writer.stop()
    endpoint = await until(lambda: c.endpoint("p.db"), 10, "the database endpoint")
    node, new_host = endpoint.node, endpoint.host
    assert node in ("b", "c")
    assert not set(writer.acked) - await rows_on(port, new_host)
    other = "c" if node == "b" else "b"

    async def other_follows() -> bool:
        st = await c.status(other)
        db = st.database if st else None
        return bool(db and db.get("role") == "standby" and db.get("upstream") == new_host)

    await until(other_follows, 60, f"{other} following the new primary")


@pytest.mark.long
async def test_three_nodes_a_standby_named_before_it_is_recorded_never_costs_a_commit(
    db_cluster3: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """a primary, b its recorded synchronous standby, c stopped, a writer committing.
    c starts: a's agent names ``ANY 1 (b, c)`` and freezes right there, before it writes
    the record (a test hook). b then stops receiving (a's walsender to it frozen), so the
    writer's commits are acknowledged by c alone, and a dies. Every acknowledged row must
    be on whichever node takes over: b, which lacks them, must not."""
    import signal

    from tests.integration.test_fence_services import stopped

    c, port = db_cluster3
    gate = c.tmp / "stop-after-sync-names"
    monkeypatch.setenv("HAPAIR_TEST_STOP_AFTER_SYNC_NAMES", str(gate))
    _, epoch = await ready(c, port)
    monkeypatch.delenv("HAPAIR_TEST_STOP_AFTER_SYNC_NAMES")
    writer = await steady_writer(port, 100, THREE)
    gate.touch()
    c.start("c")
    agent = c.agents["a"].pid

    async def a_frozen() -> bool:
        return stopped(agent)

    await until(a_frozen, 60, "a's agent frozen once it named c", step=0.002)
    gate.unlink()
    async with stalled_walsender("127.0.0.1", port, "b") as walsender:
        await more_commits(writer, 20, 10, "commits acknowledged by c alone")
        record = await sync_state(c)
        c.crash("a")
        with contextlib.suppress(ProcessLookupError):  # orphaned if the watchdog was first
            os.kill(walsender, signal.SIGKILL)
    await c.active("p", not_epoch=epoch, timeout=60)

    async def moved() -> Any:
        e = await c.endpoint("p.db")
        return e if e is not None and e.epoch > epoch else None

    endpoint = await until(moved, 30, "p.db published by the new active")
    await more_commits(writer, 20, 60, "commits on the new primary")
    await writer.stop()
    lost = set(writer.acked) - await rows_on(port, endpoint.host)
    assert not lost, (
        f"{len(lost)} acknowledged commits lost: {endpoint.node} took over, the record "
        f"when a named c said {record}"
    )
    assert record is not None and "c" in record.sync, f"c named but not recorded: {record}"
    # b answers with less WAL than c: c alone may take over, and does.
    assert endpoint.node == "c", f"{endpoint.node} took over"


@pytest.mark.long
async def test_three_nodes_the_survivor_waits_when_a_dead_standby_may_hold_more(
    db_cluster3: tuple[Cluster, int],
) -> None:
    """a primary, b and c its recorded quorum standbys (``ANY 1 (b, c)``), a writer.
    c stops receiving (a's walsender to it frozen), so commits are acknowledged by b
    alone; then a and b die together. c may lack those commits and b cannot say how
    far it got: c must not take over by itself, and its decision says why."""
    import signal

    from tests.support.cluster import holds

    c, port = db_cluster3
    await quorum_ready(c, port)
    writer = await steady_writer(port, 100, THREE)
    async with stalled_walsender("127.0.0.1", port, "c") as walsender:
        await more_commits(writer, 50, 15, "commits acknowledged by b alone")
        c.crash("a")
        c.crash("b")
        with contextlib.suppress(ProcessLookupError):
            os.kill(walsender, signal.SIGKILL)
    await writer.stop()

    async def nobody() -> bool:
        return await c.leader("p") is None

    await until(nobody, 10, "a's leader key expired")
    try:
        await holds(nobody, 8, "c took over though b, dead, may hold commits it lacks")
    except AssertionError:
        lead = await c.leader("p")
        if lead is not None and lead[0] == "c":
            lost = set(writer.acked) - await until(
                lambda: rows_on(port, "127.0.0.3"), 30, "rows on c"
            )
            raise AssertionError(f"c took over: {len(lost)} acknowledged commits lost") from None
        raise
    assert "does not answer" in c.log("c"), "c's decision does not say why it waits"


async def test_a_postgresql_crash_on_the_active_is_repaired_in_place(
    db_cluster: tuple[Cluster, int],
) -> None:
    import signal

    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 100)
    pid = await postmaster(c, "a")
    os.kill(pid, signal.SIGKILL)  # the postmaster only; the agent lives on
    await more_commits(writer, 50, 30, "commits after the restart in place")
    await writer.stop()
    assert await c.leader("p") == ("a", epoch), "a PostgreSQL crash alone must not move the pair"
    assert not set(writer.acked) - await rows_on(port, "127.0.0.1")

    async def replayed_on_b() -> bool:  # flushed there at commit, replayed soon after
        return not set(writer.acked) - await rows_on(port, "127.0.0.2")

    await until(replayed_on_b, 10, "every acknowledged row on the standby too")


async def test_an_operator_forces_a_standby_that_may_lack_commits_with_a_warning(
    db_cluster: tuple[Cluster, int],
) -> None:
    """b stopped, a went asynchronous and went on committing, then a crashed: b is not
    recorded as holding every commit, so it never takes over by itself. An operator
    forces it, warned that a's last commits are missing there."""

    from hapair.shared import admin
    from tests.support.cluster import holds

    c, port = db_cluster
    await ready(c, port)
    writer = await steady_writer(port, 50)
    await stop_b_until_degraded(c)
    await more_commits(writer, 50, 15, "commits on a alone")
    await writer.stop()
    c.crash("a")
    c.start("b")
    await c.standby("b", timeout=60)

    async def nobody() -> bool:
        return await c.leader("p") is None

    await until(nobody, 10, "a's leader key expired")
    await holds(nobody, 3, "b took over by itself though it may lack commits")
    with pytest.raises(admin.AdminError, match="c is not a node of pair p"):
        await admin.takeover_risk(c.store, "p", "c")
    risk = await admin.takeover_risk(c.store, "p", "b")
    warning = risk.warning()
    assert warning is not None and "only a do" in warning and "lost for good" in warning
    await admin.force_takeover(c.store, "p", "b", "test operator")
    await c.active("p", node="b", timeout=30)
    assert [e for e in await c.events("takeover_forced") if e["node"] == "b"]
    assert await c.store.get(keys.takeover("p")) is None, "the request outlived its election"
    await until(lambda: inserted(port, -2), 30, "a write on b")
    with pytest.raises(admin.AdminError, match="has an active node"):
        await admin.force_takeover(c.store, "p", "b", "test operator")


async def test_a_database_that_cannot_restart_moves_the_pair_to_its_sync_standby(
    db_cluster: tuple[Cluster, int],
) -> None:
    import signal

    c, port = db_cluster
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 100)
    data = c.tmp / "p" / "a" / "pg"
    pid = await postmaster(c, "a")
    data.chmod(0o000)  # PostgreSQL can no longer start from it
    try:
        os.kill(pid, signal.SIGKILL)
        await c.active("p", not_epoch=epoch, node="b", timeout=60)
        await more_commits(writer, 50, 30, "commits on b")
        await writer.stop()
        assert not set(writer.acked) - await rows_on(port, "127.0.0.2")
        moved = [e for e in await c.events("switchover") if e["node"] == "a"]
        assert moved and "database" in moved[-1]["reason"]
    finally:
        with contextlib.suppress(FileNotFoundError):  # a, as b's standby, may reclone
            data.chmod(0o700)


@pytest.mark.long
async def test_a_database_that_cannot_restart_stays_without_a_sync_standby(
    db_cluster: tuple[Cluster, int],
) -> None:
    """b is down and a asynchronous: leaving would leave no database at all, and b,
    when it comes back, may lack commits. a stays and repairs."""
    import signal

    from tests.support.cluster import holds

    c, port = db_cluster
    _, epoch = await ready(c, port)
    await stop_b_until_degraded(c)
    data = c.tmp / "p" / "a" / "pg"
    pid = await postmaster(c, "a")
    data.chmod(0o000)
    try:
        os.kill(pid, signal.SIGKILL)

        async def still_a() -> bool:
            return await c.leader("p") == ("a", epoch)

        await holds(still_a, 8, "the pair moved to a standby that may lack commits")
    finally:
        data.chmod(0o700)

    await until(lambda: inserted(port, -3), 30, "a's database repaired in place")
    assert await c.leader("p") == ("a", epoch)


async def report(c: Cluster, node: str, ok: bool) -> None:
    """A service on ``node`` reports the critical PLC reached or lost (grace 0.5 s)."""
    lease = await c.store.grant(60)
    resources = {"plc:press-1": Resource(ok=ok, critical=True, grace_s=0.5)}
    await c.store.put(
        keys.report(node, "comm"),
        ResourceReport(service="comm", resources=resources).encode(),
        lease=lease,
    )


async def b_back_but_held(
    c: Cluster, port: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Writer, Path]:
    """a commits alone (b stopped, a degraded), then b's agent starts again, held before
    it follows (a test hook, while the returned file exists): b is a healthy standby,
    its database not running, lacking a's last commits. a's epoch and the writer."""
    _, epoch = await ready(c, port)
    writer = await steady_writer(port, 50)
    await stop_b_until_degraded(c)
    await more_commits(writer, 100, 15, "commits on a alone")
    gate = c.tmp / "follow-gate"
    gate.touch()
    monkeypatch.setenv("HAPAIR_TEST_FOLLOW_GATE", str(gate))
    c.start("b")
    monkeypatch.delenv("HAPAIR_TEST_FOLLOW_GATE")
    await c.standby("b", timeout=60)
    return epoch, writer, gate


@pytest.mark.long
async def test_a_critical_resource_lost_while_the_standby_catches_up_loses_no_commit(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """b rejoins after a committed alone and is held before it follows (a test hook):
    healthy, reaching the PLC, but not recorded synchronous. a loses the PLC: it must
    stay, for b lacks a's last commits. Once b caught up and is recorded, the switch
    happens, carrying a's final position: nothing acknowledged is lost."""
    from tests.support.cluster import holds

    c, port = db_cluster
    epoch, writer, gate = await b_back_but_held(c, port, monkeypatch)
    await report(c, "b", ok=True)
    await report(c, "a", ok=False)

    async def alarm() -> bool:
        st = await c.status("a")
        return st is not None and "critical resource plc:press-1 lost" in st.problems

    await until(alarm, 10, "the lost PLC in a's status")

    async def a_keeps_the_pair() -> bool:
        st = await c.status("b")
        db = (st.database or {}) if st else {}
        return await c.leader("p") == ("a", epoch) and db.get("role") != "primary"

    # Many grace times: the pair would have moved by now if b could receive it.
    await holds(a_keeps_the_pair, 4, "the pair moved to a standby lacking a's commits")
    await more_commits(writer, 50, 15, "commits on a while b is held")
    gate.unlink()
    await c.active("p", not_epoch=epoch, node="b", timeout=60)
    await more_commits(writer, 50, 30, "commits on b")
    await writer.stop()
    lost = set(writer.acked) - await rows_on(port, "127.0.0.2")
    assert not lost, f"{len(lost)} acknowledged commits lost"
    moved = [e for e in await c.events("switchover") if e["node"] == "a"]
    assert moved and moved[-1]["reason"] == "plc:press-1 lost on the active"


async def b_unable_to_promote(
    c: Cluster, port: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Writer]:
    """a primary, b its synchronous standby whose promotion fails from now on (a test
    hook, set when b started), a writer committing: a's epoch and the writer."""
    gate = c.tmp / "promote-gate"
    monkeypatch.setenv("HAPAIR_TEST_PROMOTE_GATE", str(gate))
    _, epoch = await ready(c, port)
    monkeypatch.delenv("HAPAIR_TEST_PROMOTE_GATE")
    writer = await steady_writer(port, 100)
    gate.touch()
    return epoch, writer


async def test_a_standby_whose_promotion_fails_leaves_the_old_primary_eligible(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """a crashes; b, its recorded synchronous standby, takes the key but cannot promote
    (a test hook fails the promotion), then dies too. a has every commit: when it comes
    back it must be allowed to take the pair over."""
    c, port = db_cluster
    epoch, writer = await b_unable_to_promote(c, port, monkeypatch)
    c.crash("a")
    await writer.stop()

    async def b_tried() -> bool:
        return "could not become primary" in c.log("b")

    await until(b_tried, 60, "b trying to promote")
    leader = await c.leader("p")
    assert leader is not None and leader[0] == "b", "b took the key"
    c.crash("b")
    c.start("a")
    await c.active("p", not_epoch=epoch, node="a", timeout=60)
    await endpoint_on(c, "a", epoch)
    lost = set(writer.acked) - await rows_on(port, "127.0.0.1")
    assert not lost, f"{len(lost)} acknowledged commits lost"
    await until(lambda: inserted(port, -4), 30, "a write on a")


async def test_a_switchover_to_a_standby_that_cannot_receive_the_final_position_is_aborted(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """b rejoins after a committed alone, held before it follows (a test hook): up and
    healthy, its database not running. A switchover to b is accepted, a stops its
    services and its database, but b cannot receive a's final position: a must keep the
    pair (same epoch), run its database and take writes again, and reject the request."""
    from hapair.shared.records import Switchover
    from tests.support.cluster import holds

    c, port = db_cluster
    epoch, writer, _ = await b_back_but_held(c, port, monkeypatch)
    request = Switchover(to="b")
    await c.store.put(keys.switchover("p"), request.encode())

    async def rejected() -> list[dict[str, Any]]:
        return [
            e
            for e in await c.events("switchover_rejected")
            if e["details"].get("request") == request.id
        ]

    events = await until(rejected, 60, "the switchover rejected")
    assert "final position" in events[0]["reason"]
    assert [e for e in await c.events("handover_aborted") if e["node"] == "a"]

    async def a_keeps_the_pair() -> bool:
        return await c.leader("p") == ("a", epoch)

    await holds(a_keeps_the_pair, 3, "the pair left a")
    await more_commits(writer, 50, 30, "commits on a again")
    await writer.stop()
    assert not set(writer.acked) - await rows_on(port, "127.0.0.1")
    st = await c.status("b")
    assert st is not None and (st.database or {}).get("role") != "primary"


@pytest.mark.long
async def test_a_second_failover_while_a_recovery_awaits_its_ack_holds_again(
    db_cluster_held: tuple[Cluster, int],
) -> None:
    """a crashes: b holds the batch service for the operator. Before anyone acknowledges,
    b crashes too (a, back as its synchronous standby, takes over): a holds the batch
    again, under its own epoch, and an ack for b's epoch is refused."""
    from hapair.shared import admin
    from hapair.shared.records import Recovery
    from tests.support.cluster import holds

    c, port = db_cluster_held
    _, epoch = await ready(c, port)
    c.crash("a")
    _, epoch_b = await c.active("p", not_epoch=epoch, node="b", timeout=60)

    async def awaiting(term: int) -> Recovery | None:
        kv = await c.store.get(keys.recovery("p"))
        rec = None if kv is None else decode(Recovery, kv.value, kv.key)
        return rec if rec is not None and rec.epoch == term and rec.state == "awaiting" else None

    await until(lambda: awaiting(epoch_b), 30, "b awaiting the operator")
    c.start("a")

    async def a_sync() -> bool:
        st = await sync_state(c)
        return st is not None and st.primary == "b" and st.sync == ["a"]

    await until(a_sync, 60, "a back as b's synchronous standby")
    c.crash("b")
    _, epoch_a = await c.active("p", not_epoch=epoch_b, node="a", timeout=60)
    record = await until(lambda: awaiting(epoch_a), 30, "a awaiting the operator")
    assert record.held == ["batch"] and record.from_node == "b"

    async def batch_held_on_a() -> bool:
        st = await c.status("a")
        svc = next((s for s in st.services if s.name == "batch"), None) if st else None
        return svc is not None and svc.state == "held"

    await holds(batch_held_on_a, 2, "the batch started on a without an acknowledgement")
    with pytest.raises(admin.AdminError, match="not"):
        await admin.ack(c.store, "p", epoch_b, "test operator")
    await admin.ack(c.store, "p", epoch_a, "test operator")

    async def batch_running_on_a() -> bool:
        st = await c.status("a")
        svc = next((s for s in st.services if s.name == "batch"), None) if st else None
        return svc is not None and svc.state == "running"

    await until(batch_running_on_a, 30, "the batch running on a once acknowledged")


async def switch_over_to(c: Cluster, node: str, tries: int = 2) -> int:
    """Ask for a switchover of p to ``node`` until ``node`` holds the pair; the epoch it
    took. The active may refuse one, or abort it (its target's view or the final position
    not confirmed in time on a loaded machine): safe, and not what the callers test. It
    then refuses that target for ``REFUSED_S``, so the request is made again after it."""
    from hapair.shared.records import Switchover

    refusals: list[str] = []
    for _ in range(tries):
        request = Switchover(to=node)
        await c.store.put(keys.switchover("p"), request.encode())

        async def outcome(request: Switchover = request) -> tuple[int | None, str] | None:
            lead = await c.leader("p")
            if lead is not None and lead[0] == node:
                return lead[1], ""
            for e in await c.events("switchover_rejected"):
                if e["details"].get("request") == request.id:
                    return None, str(e["reason"])
            return None

        epoch, why = await until(outcome, 30, f"{node} holding p, or the switchover refused")
        if epoch is not None:
            return epoch
        refusals.append(why)
        await asyncio.sleep(REFUSED_S + 1)  # the refusal of this target lapses on a timer
    raise AssertionError(f"the switchover to {node} was refused {tries} times: {refusals}")


async def test_a_new_active_that_cannot_promote_hands_the_pair_back_to_the_old_primary(
    db_cluster: tuple[Cluster, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switchover to b, whose promotion fails (a test hook): the record still names a
    as holding every commit, so b hands the pair back to it once its repair budget is
    spent, rather than keep a pair without a primary."""
    c, port = db_cluster
    epoch, writer = await b_unable_to_promote(c, port, monkeypatch)
    epoch_b = await switch_over_to(c, "b")
    assert epoch_b > epoch
    await c.active("p", not_epoch=epoch_b, node="a", timeout=60)
    await endpoint_on(c, "a", epoch_b)
    await more_commits(writer, 50, 30, "commits on a again")
    await writer.stop()
    lost = set(writer.acked) - await rows_on(port, "127.0.0.1")
    assert not lost, f"{len(lost)} acknowledged commits lost"
