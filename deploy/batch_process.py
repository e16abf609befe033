"""An example process service: a batch recipe of numbered steps that survives a failover.

Each batch runs ``--steps`` steps. Step *n* sets the setpoint of a temperature loop in
a PLC (a simulated one here), waits for the measured value to settle, and commits, in
one transaction of the pair's PostgreSQL, a row in its own table ``batch_step`` with
the step's result and the marker of the next step (:mod:`hapair.shared.process_context`).
Started again anywhere (after a crash, on the new active after the operator's ack), it
goes on at the step after the last committed one. Run it as a pair service with
``hold_until_ack: true``::

    - name: batch
      command: [python3, deploy/batch_process.py, --dsn, "dbname=mes user=mes",
                --password-file, /etc/hapair/pg-mes.pw]
      env: {HAPAIR_REGISTRY: "http://10.20.0.5:8700"}
      hold_until_ack: true

The database: with a registry (``--registry`` or ``HAPAIR_REGISTRY``) it follows the
pair's endpoint ``{pair}.db`` (``--dsn`` then gives only the database, user, ...);
without one, ``--dsn`` is a whole libpq string, e.g. ``host=10.20.1.11,10.20.1.12
port=5432 dbname=mes user=mes target_session_attrs=read-write``. The epoch is
``HAPAIR_EPOCH`` as the agent sets it (or ``--epoch``). Exit status 3: a newer term owns
the process (this instance is stale), nothing was written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from hapair.shared import log as logsetup
from hapair.shared.client import ClientError, PgAdapter, Resolver
from hapair.shared.log import EventLog
from hapair.shared.process_context import ProcessContext, StaleEpoch, StepOutOfOrder

EXIT_STALE = 3
SETPOINT, MEASURED = "TIC101.SP", "TIC101.PV"

# No UNIQUE (process, batch, step) on purpose: the tests prove from this table that no
# step ran twice. A real recipe would add one as a second guard.
TABLE = """CREATE TABLE IF NOT EXISTS batch_step (
    id bigserial PRIMARY KEY,
    process text NOT NULL,
    batch integer NOT NULL,
    step integer NOT NULL,
    epoch bigint NOT NULL,
    node text NOT NULL,
    setpoint double precision NOT NULL,
    measured double precision NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now()
)"""


class Plc(Protocol):
    """The tags the recipe uses; the comm server's client will be another one."""

    async def write(self, tag: str, value: float) -> None: ...

    async def read(self, tag: str) -> float: ...


class SimulatedPlc:
    """A temperature loop: the measured value follows the setpoint with a first-order
    lag of ``tau_s``. Writing a setpoint is idempotent, as every action a step takes
    outside the database must be: a step cut short by a crash is run again."""

    def __init__(
        self, tau_s: float = 0.05, start: float = 20.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tau_s, self.clock = tau_s, clock
        self._sp = self._from = start
        self._since = clock()

    async def write(self, tag: str, value: float) -> None:
        if tag != SETPOINT:
            raise KeyError(f"{tag} is not writable")
        self._from, self._since, self._sp = self._pv(), self.clock(), value

    async def read(self, tag: str) -> float:
        return {SETPOINT: self._sp, MEASURED: self._pv()}[tag]

    def _pv(self) -> float:
        elapsed = self.clock() - self._since
        return self._sp + (self._from - self._sp) * math.exp(-elapsed / self.tau_s)


@dataclass(frozen=True)
class Recipe:
    steps: int = 10
    step_s: float = 0.5
    batches: int = 0  # 0: one batch after the other, for ever
    pause_s: float = 1.0

    def setpoint(self, step: int) -> float:
        """A heating ramp: 25 °C at step 1, 5 °C more each step."""
        return 20.0 + 5.0 * step


async def settle(plc: Plc, target: float, tolerance: float = 0.5, timeout: float = 10.0) -> float:
    """The measured value once it is within ``tolerance`` of ``target``."""
    async with asyncio.timeout(timeout):
        while True:  # a real PLC would be read through a subscription
            pv = await plc.read(MEASURED)
            if abs(pv - target) <= tolerance:
                return pv
            await asyncio.sleep(0.02)


async def run_batches(
    ctx: ProcessContext, plc: Plc, recipe: Recipe, node: str, log: EventLog
) -> None:
    """Resume where the context says, then run steps until ``recipe.batches`` are done."""
    resume = await ctx.start(first_step=1, state={"batch": 1})
    step, batch = resume.step, int(resume.state.get("batch", 1))
    log.info(
        "starting" if resume.fresh else "resuming",
        batch=batch,
        step=step,
        last_step=resume.last_step,
        last_epoch=resume.epoch,
    )
    while recipe.batches == 0 or batch <= recipe.batches:
        async with ctx.step(step) as tx:
            # Inside the transaction: the fence is claimed before the PLC is touched, so
            # a stale instance is stopped before it acts, not only at its commit.
            setpoint = recipe.setpoint(step)
            await plc.write(SETPOINT, setpoint)
            measured = await settle(plc, setpoint)
            await asyncio.sleep(recipe.step_s)
            await tx.execute(
                "INSERT INTO batch_step (process, batch, step, epoch, node, setpoint, measured)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (ctx.process, batch, step, ctx.epoch, node, setpoint, measured),
            )
            tx.result = {"batch": batch, "setpoint": setpoint, "measured": round(measured, 2)}
            if step >= recipe.steps:
                tx.next_step, tx.state["batch"] = 1, batch + 1
        log.info("step committed", batch=batch, step=step, measured=round(measured, 2))
        if tx.next_step == 1:
            log.info("batch done", batch=batch)
            await asyncio.sleep(recipe.pause_s)
        step, batch = tx.next_step, int(tx.state["batch"])
    log.info("all batches done; idle", batches=recipe.batches)
    await asyncio.Event().wait()  # a service that exits would be restarted


@contextlib.asynccontextmanager
async def open_db(
    args: argparse.Namespace,
) -> AsyncIterator[psycopg.AsyncConnection[Any] | PgAdapter]:
    secret = {"password": args.password} if args.password else {}
    if args.registry:
        async with (
            Resolver(args.registry) as resolver,
            PgAdapter(
                resolver, f"{args.pair}.db", conninfo=args.dsn, deadline_s=30, **secret
            ) as pg,
        ):
            yield pg
    else:
        conn = await psycopg.AsyncConnection.connect(
            args.dsn, autocommit=True, connect_timeout=2, **secret
        )
        async with conn:
            yield conn


async def create_table(db: psycopg.AsyncConnection[Any] | PgAdapter) -> None:
    conn = await db.connection() if isinstance(db, PgAdapter) else db
    async with conn.transaction():
        await conn.execute(TABLE)


async def serve(args: argparse.Namespace, log: EventLog) -> int:
    recipe = Recipe(args.steps, args.step_s, args.batches, args.pause_s)
    plc = SimulatedPlc()
    delay = 0.1
    while True:
        try:
            async with open_db(args) as db:
                await create_table(db)
                ctx = ProcessContext(db, args.process, args.epoch)
                await run_batches(ctx, plc, recipe, args.node, log)
        except StaleEpoch as err:
            log.error("a newer term owns the process; stopping", reason=str(err))
            return EXIT_STALE
        except StepOutOfOrder as err:  # moved under us: read the context again
            log.warning("process moved; resuming from the database", reason=str(err))
        except (psycopg.OperationalError, ClientError, OSError) as err:
            # Lost the database (or the answer to a commit): the next start() says
            # whether the step in flight was committed.
            first_line = (str(err) or type(err).__name__).splitlines()[0]
            log.warning("database unavailable; retrying", error=first_line)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def parse(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--dsn",
        default="",
        help="libpq string: dbname, user, ... (with a registry) or also the hosts "
        "(host=A,B target_session_attrs=read-write)",
    )
    p.add_argument("--password-file", help="a file holding the password (as for the site file)")
    p.add_argument(
        "--registry", default=env("HAPAIR_REGISTRY"), help="URL[,URL...]: $HAPAIR_REGISTRY"
    )
    p.add_argument("--pair", default=env("HAPAIR_PAIR"), help="default: $HAPAIR_PAIR")
    p.add_argument("--node", default=env("HAPAIR_NODE", "?"), help="default: $HAPAIR_NODE")
    p.add_argument("--epoch", type=int, default=env("HAPAIR_EPOCH") or None, help="$HAPAIR_EPOCH")
    p.add_argument(
        "--process", default=env("HAPAIR_SERVICE", "batch"), help="context name: $HAPAIR_SERVICE"
    )
    p.add_argument("--steps", type=int, default=10, help="steps per batch (10)")
    p.add_argument("--step-s", type=float, default=0.5, help="seconds per step (0.5)")
    p.add_argument("--batches", type=int, default=0, help="batches to run; 0: for ever")
    p.add_argument("--pause-s", type=float, default=1.0, help="pause between batches (1)")
    args = p.parse_args(argv)
    if args.epoch is None or args.epoch < 1:
        p.error("no epoch: run it as a pair service (HAPAIR_EPOCH) or give --epoch")
    if args.registry and not args.pair:
        p.error("following the database through a registry needs --pair or HAPAIR_PAIR")
    if not args.registry and not args.dsn and not env("PGHOST"):
        p.error("give a registry (--registry, HAPAIR_REGISTRY) or the hosts in --dsn")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    args.password = None
    if args.password_file:
        try:
            with open(args.password_file) as f:
                args.password = f.read().strip()
        except OSError as err:
            p.error(f"cannot read the password file: {err}")
    return args


async def amain(args: argparse.Namespace) -> int:
    log = EventLog("hapair.batch", process=args.process, node=args.node, epoch=args.epoch)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await serve(args, log)
    except asyncio.CancelledError:
        log.info("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logsetup.setup(os.environ.get("HAPAIR_LOG_LEVEL", "info"))
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
