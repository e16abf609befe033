"""The execution context of a process run step by step, kept in the pair's PostgreSQL.

A service that drives a process (a batch recipe, a sequence of machine moves) commits
each step in one transaction with three things: the step's own data (its rows, in its
own tables), the step's result, and the marker of the next step, all tagged with the
term's epoch. After a failover the new active's instance reads the marker and goes on
at the next step: a step is either committed with its data, or not at all, so none is
run twice and none is skipped (as far as the database is concerned: an action on a
machine outside the database is repeated if the crash came before the commit, so make
it idempotent, e.g. "set the setpoint to 80", never "add 5").

A stale instance (an old active frozen, then resumed after the switch) must never move
the process forward. Every step therefore first claims the process's *fence* with its
epoch, inside the step's transaction: the database itself raises when the fence holds
a newer epoch, which aborts the transaction, so nothing that transaction wrote can be
committed. The claim also locks the fence row until the step ends, so a newer
instance starting meanwhile waits for the step to commit (or not) and then reads the
truth.

Usage::

    ctx = ProcessContext(conn_or_pg_adapter, "mixer-1", epoch)
    resume = await ctx.start()                  # claims the fence; where to go on
    n = resume.step
    async with ctx.step(n) as tx:               # one transaction
        await tx.execute("INSERT INTO batch_step ...", {...})
        tx.result = {"measured": 81.2}
        tx.state["batch"] = 7                   # carried to the next step
        tx.next_step = n + 1                    # the default

Tables (created by :meth:`ProcessContext.start` when missing): ``hapair_fence``
(process, epoch: the newest epoch that claimed it) and ``hapair_process_context``
(process, next_step, state, last_step, last_result, epoch, steps_committed,
committed_at), and the function ``hapair_fence_claim(process, epoch)``; by
:func:`fence_all`: ``hapair_epoch_floor`` (the epoch of the newest primary: no claim
may be older, whether the process has a fence yet or not).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import Field

from hapair.shared.model import LenientModel

if TYPE_CHECKING:
    from psycopg.abc import Params, QueryNoTemplate

    # Only named: the agent fences through this module and has no use for the client
    # library (and aiohttp, which it loads).
    from hapair.shared.client.pg import PgAdapter

FLOOR_LOCK = 1751216226
"""Advisory lock: a claim holds it shared for its step, ``fence_all`` exclusively while
it raises the floor, so no claim reads a floor that is being raised."""
_FLOOR: tuple[LiteralString, ...] = (
    "SELECT pg_advisory_xact_lock(1751216225)",  # the schema's lock: one creator at once
    """CREATE TABLE IF NOT EXISTS hapair_epoch_floor (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        epoch bigint NOT NULL CHECK (epoch > 0)
    )""",
    "GRANT SELECT ON hapair_epoch_floor TO PUBLIC",
)
STALE_EPOCH_SQLSTATE = "ZF001"
"""Raised by ``hapair_fence_claim``; a class psycopg maps to plain ``DatabaseError``, so
no retry loop takes it for a lost connection."""

_SCHEMA: tuple[LiteralString, ...] = (
    # Instances starting at once would race on the catalog ("tuple concurrently updated").
    "SELECT pg_advisory_xact_lock(1751216225)",  # 0x68617061, "hapa"
    """CREATE TABLE IF NOT EXISTS hapair_fence (
        process text PRIMARY KEY,
        epoch bigint NOT NULL CHECK (epoch > 0),
        claimed_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS hapair_process_context (
        process text PRIMARY KEY REFERENCES hapair_fence ON DELETE CASCADE,
        next_step bigint NOT NULL,
        state jsonb NOT NULL DEFAULT '{}',
        last_step bigint,
        last_result jsonb,
        epoch bigint NOT NULL,
        steps_committed bigint NOT NULL DEFAULT 0,
        committed_at timestamptz NOT NULL DEFAULT now()
    )""",
    # Raises (aborting the transaction) when a newer epoch holds the fence, or the
    # floor every new primary raises (a process never claimed has no fence of its own);
    # otherwise raises the fence to p_epoch and keeps its row locked until the
    # transaction ends.
    """CREATE OR REPLACE FUNCTION hapair_fence_claim(p_process text, p_epoch bigint)
    RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        fenced bigint;
        floor bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(1751216226);
        IF to_regclass('hapair_epoch_floor') IS NOT NULL THEN
            EXECUTE 'SELECT epoch FROM hapair_epoch_floor' INTO floor;
            IF p_epoch < floor THEN
                RAISE EXCEPTION 'stale epoch % for process %: a new primary fenced every '
                    'process at epoch %', p_epoch, p_process, floor
                    USING ERRCODE = 'ZF001', DETAIL = floor::text;
            END IF;
        END IF;
        INSERT INTO hapair_fence AS f (process, epoch) VALUES (p_process, p_epoch)
        ON CONFLICT (process) DO UPDATE
            SET epoch = EXCLUDED.epoch,
                claimed_at = CASE WHEN f.epoch < EXCLUDED.epoch THEN now()
                                  ELSE f.claimed_at END
            WHERE f.epoch <= EXCLUDED.epoch
        RETURNING f.epoch INTO fenced;
        IF NOT FOUND THEN  -- the row is locked all the same: read it
            SELECT f.epoch INTO fenced FROM hapair_fence AS f WHERE f.process = p_process;
            RAISE EXCEPTION 'stale epoch % for process %: fenced by epoch %',
                p_epoch, p_process, fenced
                USING ERRCODE = 'ZF001', DETAIL = fenced::text;
        END IF;
        RETURN fenced;
    END
    $$""",
)

_READ: LiteralString = """
    SELECT c.process, c.next_step AS step, c.state, c.last_step, c.last_result, c.epoch,
           f.epoch AS fence, c.steps_committed, c.committed_at
    FROM hapair_process_context AS c JOIN hapair_fence AS f USING (process)
    WHERE c.process = %(p)s
"""


class ProcessContextError(Exception):
    """A process context cannot be used as asked."""


class StaleEpoch(ProcessContextError):
    """A newer term has claimed the process: this instance must stop driving it."""

    def __init__(self, process: str, epoch: int, fence: int | None) -> None:
        self.process, self.epoch, self.fence = process, epoch, fence
        super().__init__(
            f"process {process!r}: epoch {epoch} is stale, the fence holds epoch {fence}; "
            "a newer active owns the process, nothing was written"
        )


class StepOutOfOrder(ProcessContextError):
    """The step asked for is not the next one: something else moved the process."""

    def __init__(self, process: str, step: int, expected: int) -> None:
        self.process, self.step, self.expected = process, step, expected
        super().__init__(
            f"process {process!r}: step {step} asked, but the next step is {expected}; "
            "nothing was written (call start() again to resume)"
        )


class Resume(LenientModel):
    """What the process would go on from: its committed context, read back."""

    process: str
    step: int
    """The next step to run."""
    state: dict[str, Any] = Field(default_factory=dict)
    """What the last step carried forward."""
    last_step: int | None = None
    last_result: dict[str, Any] | None = None
    epoch: int = Field(ge=1)
    """The epoch that committed the last step (or created the context)."""
    fence: int = Field(ge=1)
    """The newest epoch that claimed the process."""
    steps_committed: int = Field(ge=0)
    committed_at: dt.datetime

    @property
    def fresh(self) -> bool:
        """No step was ever committed."""
        return self.steps_committed == 0


@dataclass
class StepTx:
    """One step's transaction: write the step's data with :meth:`execute` (or ``conn``),
    set ``result``, ``state`` and ``next_step``; all commit together at the block's end."""

    conn: psycopg.AsyncConnection[Any]
    process: str
    step: int
    epoch: int
    state: dict[str, Any]
    """A copy of the committed state; what it holds at the end is committed."""
    next_step: int
    result: dict[str, Any] = field(default_factory=dict)

    async def execute(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> psycopg.AsyncCursor[Any]:
        return await self.conn.execute(query, params)


class ProcessContext:
    """The context of one process (``process``, a name unique in the database) as driven
    by the instance of term ``epoch``. ``db`` is an open ``AsyncConnection`` or a
    :class:`~shared.client.pg.PgAdapter` (its current connection is used for each call;
    a call that fails on a lost connection is not repeated: call :meth:`start` again,
    which tells whether the step in flight was committed)."""

    def __init__(
        self, db: psycopg.AsyncConnection[Any] | PgAdapter, process: str, epoch: int
    ) -> None:
        if not process:
            raise ValueError("a process needs a name")
        if epoch < 1:
            raise ValueError(f"epoch must be a term's epoch (>= 1), got {epoch}")
        self.db = db
        self.process = process
        self.epoch = epoch
        self._schema_ready = False

    async def start(self, *, first_step: int = 1, state: Mapping[str, Any] | None = None) -> Resume:
        """Claim the process for this epoch and say where to go on from; a process
        never seen starts at ``first_step`` with ``state``. :class:`StaleEpoch` when a
        newer epoch has claimed it."""
        conn = await self._connection()
        async with conn.transaction():
            if not self._schema_ready:
                await ensure_schema(conn)
            await self._claim(conn)
            await conn.execute(
                "INSERT INTO hapair_process_context (process, next_step, state, epoch)"
                " VALUES (%(p)s, %(s)s, %(st)s, %(e)s) ON CONFLICT (process) DO NOTHING",
                {"p": self.process, "s": first_step, "st": Jsonb(dict(state or {})),
                 "e": self.epoch},
            )  # fmt: skip
            resume = await self._read(conn)
        self._schema_ready = True
        assert resume is not None  # inserted above, and the fence row is ours
        return resume

    @contextlib.asynccontextmanager
    async def step(self, n: int) -> AsyncIterator[StepTx]:
        """Run step ``n`` in one transaction: the claim, the body's writes, then the
        result and the next-step marker. An exception in the body rolls all of it back
        (and propagates). :class:`StaleEpoch` or :class:`StepOutOfOrder` before the body
        runs, with nothing written."""
        conn = await self._connection()
        async with conn.transaction():
            await self._claim(conn)
            current = await self._read(conn, lock=True)
            if current is None:
                raise ProcessContextError(
                    f"process {self.process!r} has no context yet: call start() first"
                )
            if current.step != n:
                raise StepOutOfOrder(self.process, n, current.step)
            tx = StepTx(conn, self.process, n, self.epoch, dict(current.state), n + 1)
            yield tx
            await conn.execute(
                """UPDATE hapair_process_context
                   SET next_step = %(next)s, state = %(state)s, last_step = %(n)s,
                       last_result = %(result)s, epoch = %(e)s,
                       steps_committed = steps_committed + 1, committed_at = now()
                   WHERE process = %(p)s""",
                {"next": tx.next_step, "state": Jsonb(tx.state), "n": n,
                 "result": Jsonb(tx.result), "e": self.epoch, "p": self.process},
            )  # fmt: skip

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        db = self.db
        conn = db if isinstance(db, psycopg.AsyncConnection) else await db.connection()
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            # A step inside someone else's transaction would commit when they do, not
            # at the end of the step.
            raise ProcessContextError(
                "the connection is inside a transaction: commit or roll it back first"
            )
        return conn

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.execute(
                "SELECT hapair_fence_claim(%(p)s::text, %(e)s::bigint)",
                {"p": self.process, "e": self.epoch},
            )
        except psycopg.errors.UndefinedFunction as err:
            raise ProcessContextError(
                f"process {self.process!r}: no context tables here yet: call start() first"
            ) from err
        except psycopg.Error as err:
            if err.sqlstate != STALE_EPOCH_SQLSTATE:
                raise
            detail = err.diag.message_detail
            fence = int(detail) if detail and detail.isdigit() else None
            raise StaleEpoch(self.process, self.epoch, fence) from err

    async def _read(self, conn: psycopg.AsyncConnection[Any], lock: bool = False) -> Resume | None:
        query: LiteralString = _READ + (" FOR UPDATE OF c" if lock else "")
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, {"p": self.process})
            row = await cur.fetchone()
        return None if row is None else Resume.model_validate(row)


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Create the tables and the claim function if missing (in the caller's transaction
    if there is one; serialised between instances by an advisory lock)."""
    async with conn.transaction():
        for statement in _SCHEMA:
            await conn.execute(statement)


async def read_context(conn: psycopg.AsyncConnection[Any], process: str) -> Resume | None:
    """The committed context of ``process``, or None (never claimed, or no tables yet).
    Read-only, no claim: works on a standby too, e.g. to show an operator where a held
    service would resume."""
    # In a transaction of its own, so that a connection without autocommit is left idle.
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT to_regclass('hapair_process_context') IS NOT NULL AS ok")
        found = await cur.fetchone()
        if not found or not found["ok"]:
            return None
        await cur.execute(_READ, {"p": process})
        row = await cur.fetchone()
    return None if row is None else Resume.model_validate(row)


async def fence_all(
    conn: psycopg.AsyncConnection[Any], epoch: int, lock_timeout_s: float = 5.0
) -> int:
    """Raise every process's fence, and the floor of those never claimed yet, to
    ``epoch``; how many fences moved. For the new active's agent right after promotion,
    so that no stale instance can create or move any process while its held services
    wait for the operator. Waits for the steps in flight (at most ``lock_timeout_s``,
    then raises: call it again)."""
    async with conn.transaction(), conn.cursor() as cur:
        timeout = f"{max(1, round(lock_timeout_s * 1000))}ms"
        await cur.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
        # Not waiting for a synchronous standby, which may be gone (the primary degrades
        # only once the fences are up). A fence lost with this server is harmless: the
        # next primary raises its own, to a newer epoch.
        await cur.execute("SELECT set_config('synchronous_commit', 'local', true)")
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (FLOOR_LOCK,))
        for statement in _FLOOR:
            await cur.execute(statement)
        await cur.execute(
            "INSERT INTO hapair_epoch_floor (epoch) VALUES (%(e)s) ON CONFLICT (one)"
            " DO UPDATE SET epoch = GREATEST(hapair_epoch_floor.epoch, EXCLUDED.epoch)",
            {"e": epoch},
        )
        await cur.execute("SELECT to_regclass('hapair_fence') IS NOT NULL")
        found = await cur.fetchone()
        if not found or not found[0]:
            return 0
        await cur.execute(
            "UPDATE hapair_fence SET epoch = %(e)s, claimed_at = now() WHERE epoch < %(e)s",
            {"e": epoch},
        )
        return cur.rowcount
