"""The process context library and the example batch process, on real PostgreSQL.

The library's tests share one primary (module scope); each test works in a schema of
its own. The last test runs real agents with a database pair and the example process
as a ``hold_until_ack`` service, crashes the main mid-batch, acknowledges with the
``hapair ack`` command and checks from the database that every step ran exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from hapair.shared import keys
from hapair.shared.process_context import (
    STALE_EPOCH_SQLSTATE,
    ProcessContext,
    ProcessContextError,
    Resume,
    StaleEpoch,
    StepOutOfOrder,
    fence_all,
    read_context,
)
from hapair.shared.records import HeldContext, Recovery, SyncState, decode
from hapair.shared.report import SiteReport
from hapair.workshop_agent import recovery
from tests.support.client_lab import registry_in_process
from tests.support.cluster import THIS_TREE, Cluster, holds, until
from tests.support.harness import PYTHON, ROOT, Etcd
from tests.support.pg_harness import (
    PASSWORDS,
    PgCluster,
    common_free_port,
    database_section,
    needs_postgres,
    running_cluster,
    write_secrets,
)

pytestmark = needs_postgres
MODULE = pytest.mark.asyncio(loop_scope="module")
BATCH = str(ROOT / "deploy" / "batch_process.py")
HAPAIR = str(Path(sys.executable).parent / "hapair")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pg() -> AsyncIterator[PgCluster]:
    """One primary for the library's tests (no standby: nothing here needs one)."""
    async with running_cluster(2) as cluster:
        await cluster.mgr["a"].ensure_primary(1)
        yield cluster


@contextlib.asynccontextmanager
async def connect(pg: PgCluster, schema: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection (autocommit) working in ``schema``, created if missing."""
    async with await pg.connect("a") as conn:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET search_path = {schema}")
        await conn.execute("CREATE TABLE IF NOT EXISTS step_data (process text, step int)")
        yield conn


async def data(conn: psycopg.AsyncConnection[Any], process: str) -> list[int]:
    cur = await conn.execute(
        "SELECT step FROM step_data WHERE process = %s ORDER BY step", (process,)
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def context(conn: psycopg.AsyncConnection[Any], process: str) -> Resume:
    found = await read_context(conn, process)
    assert found is not None, f"no context for {process}"
    return found


async def run_step(ctx: ProcessContext, n: int) -> None:
    async with ctx.step(n) as tx:
        await tx.execute("INSERT INTO step_data VALUES (%s, %s)", (ctx.process, n))
        tx.result = {"done": n}
        tx.state["total"] = tx.state.get("total", 0) + n


@MODULE
async def test_a_step_commits_with_its_data_or_not_at_all(pg: PgCluster) -> None:
    async with connect(pg, "atomic") as conn, connect(pg, "atomic") as admin:
        ctx = ProcessContext(conn, "p", 5)
        assert (await ctx.start()).step == 1
        await run_step(ctx, 1)

        # The body fails after writing its data: neither the data nor the marker stay.
        with pytest.raises(RuntimeError, match="PLC fault"):
            async with ctx.step(2) as tx:
                await tx.execute("INSERT INTO step_data VALUES ('p', 2)")
                tx.result = {"done": 2}
                raise RuntimeError("PLC fault")

        # The connection is lost in the middle of the step: nothing of it either.
        with pytest.raises(psycopg.OperationalError):
            async with ctx.step(2) as tx:
                await tx.execute("INSERT INTO step_data VALUES ('p', 2)")
                await admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
                await tx.execute("SELECT 1")

        assert await data(admin, "p") == [1]
        now = await context(admin, "p")
        assert (now.step, now.last_step, now.last_result, now.steps_committed) == (
            2,
            1,
            {"done": 1},
            1,
        )


@MODULE
async def test_resume_from_the_last_committed_step(pg: PgCluster) -> None:
    async with connect(pg, "resume") as conn:
        first = ProcessContext(conn, "p", 5)
        assert (await first.start(first_step=1, state={"batch": 7})).fresh
        for n in (1, 2, 3):
            await run_step(first, n)
        assert await read_context(conn, "never claimed") is None

    # The service restarted in the same term, then a new term on the other node.
    for epoch in (5, 8):
        async with connect(pg, "resume") as conn:
            ctx = ProcessContext(conn, "p", epoch)
            resume = await ctx.start(first_step=1, state={"batch": 1})  # ignored: exists
            assert not resume.fresh
            assert (resume.step, resume.last_step, resume.last_result) == (4, 3, {"done": 3})
            assert resume.state == {"batch": 7, "total": 6}
            assert (resume.epoch, resume.fence, resume.steps_committed) == (5, epoch, 3)
            if epoch == 8:
                await run_step(ctx, 4)

    async with connect(pg, "resume") as conn:
        assert await data(conn, "p") == [1, 2, 3, 4]
        now = await context(conn, "p")
        assert (now.step, now.epoch, now.state["total"]) == (5, 8, 10)


@MODULE
async def test_an_older_epoch_cannot_move_the_process(pg: PgCluster) -> None:
    async with connect(pg, "fence") as old_conn, connect(pg, "fence") as new_conn:
        old = ProcessContext(old_conn, "p", 5)
        await old.start()
        await run_step(old, 1)
        new = ProcessContext(new_conn, "p", 9)  # the new active claims the process
        assert (await new.start()).step == 2

        ran = False
        with pytest.raises(StaleEpoch, match="epoch 5 is stale, the fence holds epoch 9") as err:
            async with old.step(2):
                ran = True
        assert not ran and (err.value.epoch, err.value.fence) == (5, 9)
        with pytest.raises(StaleEpoch):
            await old.start()

        # The database itself refuses, not only the library: a transaction that wrote
        # first and claims with the old epoch afterwards is aborted whole.
        with pytest.raises(psycopg.Error) as refused:
            async with old_conn.transaction():
                await old_conn.execute("INSERT INTO step_data VALUES ('p', 2)")
                await old_conn.execute("SELECT hapair_fence_claim('p', 5)")
        assert refused.value.sqlstate == STALE_EPOCH_SQLSTATE

        assert await data(new_conn, "p") == [1]
        now = await context(new_conn, "p")
        assert (now.step, now.epoch, now.fence, now.steps_committed) == (2, 5, 9, 1)
        await run_step(new, 2)  # the new term goes on
        assert await data(new_conn, "p") == [1, 2]


@MODULE
async def test_a_new_term_waits_for_the_step_in_flight_then_sees_it(pg: PgCluster) -> None:
    async with connect(pg, "inflight") as old_conn, connect(pg, "inflight") as new_conn:
        old = ProcessContext(old_conn, "p", 5)
        await old.start()
        in_body, release = asyncio.Event(), asyncio.Event()

        async def slow_step() -> None:
            async with old.step(1) as tx:
                await tx.execute("INSERT INTO step_data VALUES ('p', 1)")
                in_body.set()
                await release.wait()

        stepping = asyncio.create_task(slow_step())
        await asyncio.wait_for(in_body.wait(), 5)
        starting = asyncio.create_task(ProcessContext(new_conn, "p", 9).start())
        await asyncio.sleep(0.3)
        assert not starting.done(), "the new term read the context during a step"
        release.set()
        await asyncio.wait_for(stepping, 5)
        resume = await asyncio.wait_for(starting, 5)
        assert (resume.step, resume.last_step, resume.epoch, resume.fence) == (2, 1, 5, 9)


@MODULE
async def test_misuse_writes_nothing(pg: PgCluster) -> None:
    async with connect(pg, "misuse") as conn:
        ctx = ProcessContext(conn, "p", 5)
        with pytest.raises(ProcessContextError, match="call start"):
            async with ctx.step(1):
                pass
        await ctx.start()
        with pytest.raises(StepOutOfOrder, match="step 3 asked, but the next step is 1"):
            async with ctx.step(3):
                pass
        async with conn.transaction():
            with pytest.raises(ProcessContextError, match="inside a transaction"):
                async with ctx.step(1):
                    pass
        with pytest.raises(ValueError, match="epoch"):
            ProcessContext(conn, "p", 0)
        assert await data(conn, "p") == []
        assert (await context(conn, "p")).steps_committed == 0


@MODULE
async def test_fence_all_shuts_out_every_older_epoch(pg: PgCluster) -> None:
    async with connect(pg, "promote") as conn:
        assert await fence_all(conn, 3) == 0  # no tables yet: nothing to do
        for name in ("x", "y"):
            await ProcessContext(conn, name, 5).start()
        assert await fence_all(conn, 9) == 2
        with pytest.raises(StaleEpoch):
            await ProcessContext(conn, "x", 5).start()
        assert (await ProcessContext(conn, "y", 9).start()).fence == 9


@MODULE
async def test_a_process_never_claimed_cannot_be_started_by_an_epoch_older_than_the_floor(
    pg: PgCluster,
) -> None:
    """A new primary raises every fence; a process that has none yet (never claimed
    before the promotion) must not be created, nor moved, by an older epoch."""
    async with connect(pg, "floor") as conn:
        await ProcessContext(conn, "known", 5).start()
        await fence_all(conn, 9)
        with pytest.raises(StaleEpoch) as caught:
            await ProcessContext(conn, "unseen", 8).start()
        assert caught.value.fence == 9
        assert await read_context(conn, "unseen") is None, "created by a stale epoch"
        assert (await ProcessContext(conn, "unseen", 9).start()).fence == 9


@MODULE
async def test_the_floor_holds_without_any_context_table(pg: PgCluster) -> None:
    """Raised before any process ever ran in this database: the tables a stale instance
    would create must still refuse its epoch."""
    async with connect(pg, "bare") as conn:
        assert await fence_all(conn, 9) == 0
        with pytest.raises(StaleEpoch):
            await ProcessContext(conn, "first", 8).start()
        assert (await ProcessContext(conn, "first", 9).start()).step == 1


@MODULE
async def test_the_new_active_reads_where_each_held_service_resumes(pg: PgCluster) -> None:
    """What the agent publishes with a recovery: read from its own primary, as superuser,
    in the pair's databases (here in ``mes``, schema public, as a service would)."""
    async with await pg.connect("a") as conn:
        ctx = ProcessContext(conn, "held-mixer", 7)
        await ctx.start(state={"batch": 3})
        async with ctx.step(1) as tx:
            tx.result = {"measured": 81.5}
            tx.state["batch"] = 4
        found = await read_context(conn, "held-mixer")
    assert found is not None
    names = {"mixer-svc": "held-mixer", "new-svc": "never-ran"}
    read = await recovery.read_contexts(pg.mgr["a"], names)
    assert set(read) == {"mixer-svc", "new-svc"}
    assert read["mixer-svc"] == HeldContext(
        process="held-mixer",
        database="mes",
        step=2,
        state={"batch": 4},
        last_step=1,
        last_result={"measured": 81.5},
        epoch=7,
        steps_committed=1,
        committed_at=found.committed_at.timestamp(),
    )
    assert read["new-svc"] == HeldContext(process="never-ran")  # no step, no error
    assert "next step 2, last step 1 (epoch 7)" in recovery.describe(read["mixer-svc"])

    # A server that does not answer: each context says why it is unknown.
    down = await recovery.read_contexts(pg.mgr["b"], names)
    assert down["mixer-svc"].step is None and down["new-svc"].step is None
    assert down["mixer-svc"].error is not None and "database mes" in down["mixer-svc"].error
    assert "unreadable" in recovery.describe(down["mixer-svc"])


# ---- the example process, as a program ---------------------------------------------------


def batch_dsn(pg: PgCluster, schema: str) -> str:
    return f"{pg.multi_host()} application_name=batch options='-c search_path={schema}'"


async def start_batch(dsn: str, epoch: int, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PYTHON, BATCH, "--dsn", dsn, "--epoch", str(epoch), "--process", "mixer",
        "--steps", "3", "--step-s", "0.05", "--pause-s", "0", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HAPAIR_NODE": "a"},
    )  # fmt: skip


async def batch_rows(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int, int]]:
    cur = await conn.execute("SELECT batch, step, epoch FROM batch_step ORDER BY id")
    return [(int(b), int(s), int(e)) for b, s, e in await cur.fetchall()]


@MODULE
async def test_the_example_survives_a_lost_connection_and_a_stale_instance_writes_nothing(
    pg: PgCluster,
) -> None:
    async with connect(pg, "example") as conn:
        proc = await start_batch(batch_dsn(pg, "example"), 50, "--batches", "2")
        try:

            async def committed(n: int) -> bool:
                ctx = await read_context(conn, "mixer")
                return ctx is not None and ctx.steps_committed >= n

            await until(lambda: committed(2), 20, "two steps committed")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'batch'"
            )
            await until(lambda: committed(6), 20, "both batches done")
            await holds(_alive(proc), 0.3, "the service exited after its batches")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, out.decode()
        assert "database unavailable; retrying" in out.decode()
        assert await batch_rows(conn) == [(b, s, 50) for b in (1, 2) for s in (1, 2, 3)]

        stale = await start_batch(batch_dsn(pg, "example"), 7)
        out, _ = await asyncio.wait_for(stale.communicate(), 20)
        assert stale.returncode == 3, out.decode()
        assert "a newer term owns the process" in out.decode()
        assert len(await batch_rows(conn)) == 6
        assert (await context(conn, "mixer")).fence == 50


def _alive(proc: asyncio.subprocess.Process) -> Any:
    async def alive() -> bool:
        return proc.returncode is None

    return alive


# ---- end to end: real agents, a database pair, a crash mid-batch, an ack ---------------

ADDRESSES = ("127.0.0.1", "127.0.0.2")  # PostgreSQL sees loopback clients as 127.0.0.1
STEPS = 10


@pytest.fixture
async def site(etcd: Etcd, store: object) -> AsyncIterator[tuple[Cluster, int, str]]:
    root = Path(tempfile.mkdtemp(prefix="hapair-proctest-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user below this directory
    write_secrets(root)
    port = common_free_port(ADDRESSES)
    c = Cluster(etcd, root)
    try:
        async with registry_in_process(etcd) as registry:
            batch = {
                "name": "p-batch",
                "command": [
                    PYTHON, BATCH, "--dsn", "dbname=mes user=mes",
                    "--password-file", str(root / "secrets" / "mes.pw"),
                    "--steps", str(STEPS), "--step-s", "0.2", "--pause-s", "0",
                ],
                "env": {"HAPAIR_REGISTRY": registry, **THIS_TREE},  # it follows p.db there
                "hold_until_ack": True,
                "stop_grace_s": 1,
            }  # fmt: skip
            nodes = [{"name": n, "address": a} for n, a in zip("ab", ADDRESSES, strict=True)]
            pair = {
                "name": "p",
                "nodes": nodes,
                "services": [batch],
                "database": database_section(root, port, synchronous=True),
            }
            await c.apply(c.site([pair]))
            try:
                yield c, port, registry
            finally:
                await c.stop_all()
    finally:
        if not os.environ.get("HAPAIR_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


async def on(port: int, host: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host=host, port=port, dbname="mes", user="mes", password=PASSWORDS["mes"],
        autocommit=True, connect_timeout=2,
    )  # fmt: skip


async def context_on(port: int, host: str) -> Resume | None:
    async with await on(port, host) as conn:
        return await read_context(conn, "p-batch")


async def hapair(c: Cluster, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        HAPAIR, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **c.etcd.operator_env("tester"), "COLUMNS": "200"},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode()


async def ack(c: Cluster, *args: str) -> tuple[int, str]:
    return await hapair(c, "ack", "p", *args)


@pytest.mark.e2e
async def test_a_batch_goes_on_after_a_crash_and_an_ack_with_no_step_twice_or_skipped(
    site: tuple[Cluster, int, str],
) -> None:
    c, port, registry = site
    c.start("a")
    _, epoch = await c.active("p", node="a", timeout=60)
    c.start("b")

    async def b_synchronous() -> bool:
        kv = await c.store.get(keys.sync_standby("p"))
        st = None if kv is None else decode(SyncState, kv.value, kv.key)
        return st is not None and st.primary == "a" and st.sync == ["b"]

    await until(b_synchronous, 60, "b recorded as the synchronous standby")

    # Crash the main in the middle of a batch, once b holds every commit.
    synced = await until(lambda: context_on(port, "127.0.0.1"), 10, "the batch running")

    async def mid_batch() -> Resume | None:
        ctx = await context_on(port, "127.0.0.1")
        if ctx is None or ctx.steps_committed < synced.steps_committed + 2:
            return None
        return ctx if 3 <= ctx.step <= STEPS - 2 else None

    await until(mid_batch, 30, "a batch half done on a", step=0.005)
    c.crash("a")  # the agent, the batch service and PostgreSQL die at the same instant
    _, new_epoch = await c.active("p", not_epoch=epoch, node="b", timeout=30)

    async def held() -> Recovery | None:
        kv = await c.store.get(keys.recovery("p"))
        rec = None if kv is None else decode(Recovery, kv.value, kv.key)
        return rec if rec and rec.epoch == new_epoch and rec.state == "awaiting" else None

    rec = await until(held, 10, "the recovery awaiting the operator")
    assert rec.held == ["p-batch"]
    at_crash = await until(lambda: context_on(port, "127.0.0.2"), 10, "the context on b")
    crash_batch = int(at_crash.state["batch"])

    # The new active published where the held batch would resume: what its database says.
    async def published() -> Recovery | None:
        found = await held()
        return found if found is not None and found.contexts else None

    rec = await until(published, 10, "the held service's context in the recovery")
    assert rec.contexts is not None and set(rec.contexts) == {"p-batch"}
    shown = rec.contexts["p-batch"]
    assert shown.error is None and shown.database == "mes" and shown.process == "p-batch"
    assert (shown.step, shown.last_step, shown.epoch, shown.steps_committed, shown.state) == (
        at_crash.step, at_crash.last_step, at_crash.epoch, at_crash.steps_committed,
        at_crash.state,
    )  # fmt: skip
    assert shown.epoch == epoch and shown.committed_at == at_crash.committed_at.timestamp()

    code, out = await hapair(c, "status")
    assert code == 0, out
    assert "AWAITING OPERATOR: p" in out and f"p-batch resumes at step {at_crash.step}" in out
    assert f"last: step {at_crash.last_step}, epoch {epoch}" in out
    async with aiohttp.ClientSession() as http, http.get(f"{registry}/v1/site") as resp:
        report = SiteReport.model_validate(await resp.json())
    pair = next(p for w in report.workshops for p in w.pairs if p.name == "p")
    assert pair.recovery is not None and pair.recovery.contexts is not None
    assert pair.recovery.contexts["p-batch"].step == at_crash.step

    async def unmoved() -> bool:
        return await context_on(port, "127.0.0.2") == at_crash

    await holds(unmoved, 1.0, "the process moved before the operator's ack")

    code, out = await ack(c, "--epoch", str(new_epoch))
    assert code == 0, out
    kv = await c.store.get(keys.recovery("p"))
    assert kv is not None
    acked = decode(Recovery, kv.value, kv.key)
    assert acked.state == "acknowledged" and acked.contexts == rec.contexts  # kept by the ack

    async def batch_done() -> bool:
        ctx = await context_on(port, "127.0.0.2")
        return ctx is not None and int(ctx.state["batch"]) > crash_batch

    await until(batch_done, 30, f"batch {crash_batch} finished on b")

    # From the database: each step of each batch exactly once, none skipped, and the
    # crashed batch went on under the new epoch at the step after the last committed.
    async with await on(port, "127.0.0.2") as conn:
        cur = await conn.execute(
            "SELECT batch, step, epoch, node FROM batch_step WHERE batch <= %s ORDER BY id",
            (crash_batch,),
        )
        rows = [(int(b), int(s), int(e), str(n)) for b, s, e, n in await cur.fetchall()]
        ran = [(b, s) for b, s, _, _ in rows]
        expected = [(b, s) for b in range(1, crash_batch + 1) for s in range(1, STEPS + 1)]
        assert ran == expected, f"steps run: {ran}"
        crashed = [(s, e, n) for b, s, e, n in rows if b == crash_batch]
        last_old = at_crash.step - 1
        assert crashed == [
            *((s, epoch, "a") for s in range(1, last_old + 1)),
            *((s, new_epoch, "b") for s in range(last_old + 1, STEPS + 1)),
        ]

        # The old term cannot commit a step any more (a stale active resumed late).
        stale = ProcessContext(conn, "p-batch", epoch)
        with pytest.raises(StaleEpoch):
            async with stale.step((await context(conn, "p-batch")).step):
                pass
