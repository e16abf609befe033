"""This node's PostgreSQL, driven by the agent: idempotent steps for its decision loop.

Each ``ensure_*`` looks at what is there (running or not, primary or standby, which
timeline, which upstream) and does only what is missing, so the loop may call it every
cycle. What the agent owns, and this module never decides: who is active (the etcd
lease), which standby is recorded as synchronous in etcd, and when to degrade.

Ordering the agent must keep (as Patroni does): record "no synchronous standby" in
etcd *before* ``degrade_to_async()``; a standby ``restore_sync()`` is to add to a
recorded one is recorded *before* the call; one the record did not name, or a set
smaller than the record, only *after* the call returned and each flushed what the
primary had by then. Then every acknowledged commit is on a standby the record names,
and the one of them that received the most may be promoted automatically.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from hapair.shared.process_context import fence_all
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.pg import ctl, files, hooks
from hapair.workshop_agent.pg import query as q
from hapair.workshop_agent.pg.config import DatabaseConfig, Layout
from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.node import PgNode, Timeouts
from hapair.workshop_agent.pg.proc import Runner, read_pid_file
from hapair.workshop_agent.pg.secrets import Secrets, load_secrets
from hapair.workshop_agent.pg.standby import become_standby
from hapair.workshop_agent.pg.status import PgStatus

Action = Literal[
    "none", "initialised", "started", "promoted", "cloned", "rewound", "recloned",
    "repointed", "stopped", "degraded",
]  # fmt: skip

__all__ = ["PgManager", "PgResult", "Timeouts"]

# Test hook, off unless set in the agent's environment: the agent stops itself (SIGSTOP)
# right after PostgreSQL took the promotion, before the agent has seen it writable.
STOP_AFTER_PROMOTE = bool(os.environ.get("HAPAIR_TEST_STOP_AFTER_PROMOTE"))


@dataclass(frozen=True)
class PgResult:
    """What an operation did, as a sentence for the log and the tests."""

    action: Action
    detail: str
    took_s: float

    def __str__(self) -> str:
        return f"{self.action} in {self.took_s:.3f} s: {self.detail}"


class PgManager:
    """PostgreSQL on one node of a pair."""

    def __init__(
        self,
        config: DatabaseConfig,
        pair: Pair,
        node: Node,
        secrets: Secrets,
        runner: Runner,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.config = config
        self.pg = PgNode(config, pair, node, secrets, runner, timeouts or Timeouts())
        self.timeouts = self.pg.timeouts
        self.epoch: int | None = None
        self._lock = asyncio.Lock()
        self._provisioned = False

    @classmethod
    def open(
        cls, config: DatabaseConfig, pair: Pair, node: Node, timeouts: Timeouts | None = None
    ) -> PgManager:
        """Check the password files, the TLS files, the OS user and the binaries before
        anything starts."""
        runner = Runner.for_user(config.os_user)
        manager = cls(config, pair, node, load_secrets(config), runner, timeouts)
        manager.pg.check_tls()
        return manager

    @property
    def layout(self) -> Layout:
        return self.pg.layout

    @property
    def is_main(self) -> bool:
        return self.pg.pair.rank(self.pg.name) == 0

    def postmaster_pid(self) -> int | None:
        """The running postmaster's PID (for a watchdog that must kill it to fence)."""
        return self.pg.running()

    # --- the agent's operations -------------------------------------------------------

    async def ensure_primary(self, epoch: int, hold_writes: bool = False) -> PgResult:
        """Be a primary accepting writes: initialise (main node, empty data dir), start,
        or promote; then create missing roles and databases.

        ``hold_writes``: a promotion holds every commit back (none is acknowledged)
        until ``open_writes()``, so the agent can first record this node as the only one
        holding every commit: until then the old primary stays eligible."""
        async with self._step() as began:
            action = await self._become_primary(hold_writes)
            conn = await self.pg.local(self.timeouts.start_s)
            await q.wait_writable(conn, self.timeouts.promote_s)
            if action == "promoted" and not hold_writes:
                await self._sync_present(conn)
            held = (await q.primary_position(conn)).sync_names == files.HOLD_WRITES
            if not self._provisioned and not held:
                # Right after a promotion only what is missing is created (the old
                # primary made the rest); passwords are checked on the next call.
                full = action != "promoted"
                await self._provision(conn, check_passwords=full)
                self._provisioned = full
            self.epoch = epoch
            pos = await q.primary_position(conn)
            detail = f"primary for epoch {epoch}, timeline {pos.timeline}"
            return PgResult(action, detail, time.monotonic() - began)

    async def ensure_standby(self, primary_host: str) -> PgResult:
        """Be a streaming standby of ``primary_host``: clone if empty, rewind if diverged
        (a fresh clone if that fails), repoint if following another node, start."""
        async with self._step() as began:
            action = await become_standby(self.pg, primary_host)
            self._provisioned = False
            detail = f"standby of {primary_host}"
            return PgResult(action, detail, time.monotonic() - began)

    async def demote(self) -> PgResult:
        """Stop at once (fast shutdown, then immediate): for fencing, never waits on the
        lock. Cancel any ``ensure_*`` in flight first, or it may start the server again."""
        began = time.monotonic()
        self.pg.drop()
        if self.pg.running() is None:
            return PgResult("none", "not running", time.monotonic() - began)
        clean = await ctl.stop(self.layout, fast_s=self.timeouts.demote_fast_s, step="demote")
        how = "fast shutdown" if clean else "immediate shutdown (the fast one was too slow)"
        return PgResult("stopped", how, time.monotonic() - began)

    async def status(self) -> PgStatus:
        """Role, timeline, LSNs, lag and synchronous state, as the node reports them."""
        pid = self.pg.running()
        if pid is None:
            return PgStatus(role="stopped")
        pid_file = read_pid_file(self.layout.data_dir)
        if pid_file is None or pid_file.status not in ("ready", "standby"):
            return PgStatus(role="starting", pid=pid)
        try:
            conn = await self.pg.local()
            if await q.is_in_recovery(conn):
                return await _standby_status(conn, pid)
            return await _primary_status(conn, pid)
        except PgError as err:
            self.pg.drop()
            return PgStatus(role="unreachable", pid=pid, detail=str(err))

    async def switchover_prepare(self) -> int:
        """On the old primary: CHECKPOINT, fast shutdown; the shutdown checkpoint's LSN,
        which the target must have replayed (``caught_up``) before it is promoted."""
        step = "switchover_prepare"
        async with self._step():
            await q.checkpoint(await self._primary_conn(step))  # a short shutdown checkpoint
            self.pg.drop()
            if not await ctl.stop(self.layout, fast_s=self.timeouts.switchover_stop_s, step=step):
                raise PgError(step, "fast shutdown too slow: stopped immediately")
            control = await ctl.controldata(self.pg.runner, self.layout.data_dir)
            if not control.clean_primary:
                raise PgError(step, f"cluster state after the stop is {control.state!r}")
            return control.checkpoint

    async def received_by(self, host: str, lsn: int, timeout_s: float) -> bool:
        """On the old primary, stopped: whether the standby at ``host`` flushed the record
        at ``lsn`` (its shutdown checkpoint), waiting up to ``timeout_s``. A clean shutdown
        waits until every connected standby flushed it; one that was not connected never
        gets it, and must not take over."""
        conn = await self.pg.connect(host)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if not await q.is_in_recovery(conn):
                    return False  # a primary of its own: it follows nobody
                received = (await q.standby_position(conn)).receive_lsn
                if received is not None and received > lsn:  # the end, past the start
                    return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(q.POLL_S)
        finally:
            await conn.close()

    async def caught_up(self, lsn: int, timeout_s: float = 0.0) -> bool:
        """On the target standby: whether it replayed the record at ``lsn`` (the old
        primary's shutdown checkpoint), waiting up to ``timeout_s``."""
        conn = await self.pg.local()
        deadline = time.monotonic() + timeout_s
        while True:
            if not await q.is_in_recovery(conn):
                raise PgError("caught_up", "this node is not a standby")
            replayed = (await q.standby_position(conn)).replay_lsn
            if replayed is not None and replayed > lsn:  # the end of the record, past its start
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)

    async def open_writes(self) -> bool:
        """After a promotion, once recorded: commits wait only for the standbys already
        streaming from this node (usually none). Whether they were held back."""
        async with self._step():
            conn = await self._primary_conn("open writes")
            if (await q.primary_position(conn)).sync_names != files.HOLD_WRITES:
                return False
            await self._sync_present(conn)
            return True

    async def degrade_to_async(self) -> PgResult:
        """Commits stop waiting for any standby. Record it in etcd *before* calling."""
        async with self._step() as began:
            await q.set_sync_names(await self._primary_conn("degrade_to_async"), "")
            detail = "asynchronous: no synchronous standby"
            return PgResult("degraded", detail, time.monotonic() - began)

    async def restore_sync(self, names: Sequence[str]) -> list[str]:
        """Make ``names`` synchronous (any one of them, if several); those the primary
        then reports synchronous. A commit may be on any one of ``names`` alone from
        now on: the record in etcd must already name them all, or only the primary."""
        async with self._step():
            conn = await self._primary_conn("restore_sync")
            wanted = list(names) if self.config.synchronous else []
            await q.set_sync_names(conn, files.sync_names(wanted))
            return await q.wait_sync(conn, wanted, self.timeouts.sync_s) if wanted else []

    async def flush_position(self) -> int:
        """The primary's WAL flushed to its disk: every commit acknowledged so far is
        at or below it."""
        async with self._step():
            return (await q.primary_position(await self._primary_conn("flush position"))).lsn

    async def fence_processes(self, epoch: int) -> int:
        """Raise the process-context fences, and the floor of processes never claimed,
        of every database to ``epoch`` (a new term): an instance of an older term can
        then commit no step, even while the new term's held services wait for the
        operator. PgError when a database could not be fenced: call it again."""
        moved = 0
        for db in self.config.databases:
            conn = await self.pg.connect(self.pg.node.address, dbname=db.name)
            try:  # fence_all waits for locks at most the query budget, then raises
                work = fence_all(conn, epoch, lock_timeout_s=self.timeouts.query_s)
                step = f"fence processes in {db.name}"
                moved += await q.bounded(conn, work, 2 * self.timeouts.query_s, step)
            finally:
                await conn.close()
        return moved

    async def close(self) -> None:
        """Close the agent's connection (the server keeps running)."""
        await self.pg.close()

    # --- primary --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _step(self) -> AsyncIterator[float]:
        """One operation at a time; a failed one leaves no half-broken connection."""
        async with self._lock:
            try:
                yield time.monotonic()
            except PgError:
                self.pg.drop()
                raise

    async def _become_primary(self, hold_writes: bool) -> Action:
        data = self.layout.data_dir
        if self.pg.running() is not None:
            in_recovery = await self.pg.in_recovery()
            if in_recovery is False:
                return "none"
            if in_recovery:
                await self._promote(hold_writes)
                return "promoted"
        ctl.prepare_dirs(self.layout, self.pg.runner)
        if ctl.is_empty(data):
            await self._initialise()
            return "initialised"
        if not ctl.is_cluster(data):
            raise PgError("ensure_primary", f"{data} is not a PostgreSQL data dir; not touched")
        control = await ctl.controldata(self.pg.runner, data)
        if control.was_standby or any(
            (data / f).exists() for f in ("standby.signal", "backup_label")
        ):
            # A standby becomes primary by promotion only (a new timeline), never by a
            # plain start, which would continue the old timeline as if nothing happened.
            await self.pg.start(standby=True)
            await self._promote(hold_writes)
            return "promoted"
        # Restart in place: keep the synchronous standbys, they reconnect in ms.
        await self.pg.start(standby=False, keep_sync=True)
        return "started"

    async def _initialise(self) -> None:
        if not self.is_main:
            raise PgError(
                "ensure_primary",
                f"data dir {self.layout.data_dir} is empty on {self.pg.name}, which is not the "
                "main node: only the main node initialises a cluster; clone from a primary",
            )
        superuser = self.config.auth.superuser
        await ctl.initdb(self.pg.runner, self.layout, superuser, self.pg.secrets.superuser)
        await self.pg.start(standby=False)

    async def _promote(self, hold_writes: bool) -> None:
        if hooks.held("promote"):
            raise PgError("promote", "held back by HAPAIR_TEST_PROMOTE_GATE")
        conn = await self.pg.local(self.timeouts.start_s)
        if hold_writes:  # set on the standby, in force from the first commit
            await q.set_sync_names(conn, files.HOLD_WRITES)
        await ctl.promote(self.pg.runner, self.layout)
        if STOP_AFTER_PROMOTE:
            os.kill(os.getpid(), signal.SIGSTOP)
        nudge = lambda: ctl.nudge_promote(self.layout)  # noqa: E731
        await q.wait_writable(conn, self.timeouts.promote_s, nudge)
        self._provisioned = False

    async def _sync_present(self, conn: q.Conn) -> None:
        """A new primary waits only for standbys already streaming from it (usually none):
        naming absent ones would block every commit."""
        present = [r.name for r in await q.replicas(conn) if r.state == "streaming"]
        wanted = files.sync_names(present if self.config.synchronous else [])
        if (await q.primary_position(conn)).sync_names != wanted:
            await q.set_sync_names(conn, wanted)

    async def _provision(self, conn: q.Conn, check_passwords: bool) -> None:
        auth, secrets, check = self.config.auth, self.pg.secrets, check_passwords
        await q.ensure_role(conn, auth.superuser, secrets.superuser, check_password=check)
        await q.ensure_role(
            conn, auth.replication_user, secrets.replication, replication=True, check_password=check
        )
        for db in self.config.databases:
            await q.ensure_role(conn, db.owner, secrets.owners[db.owner], check_password=check)
            await q.ensure_database(conn, db.name, db.owner)

    async def _primary_conn(self, step: str) -> q.Conn:
        conn = await self.pg.local()
        if await q.is_in_recovery(conn):
            raise PgError(step, "this node is not a primary")
        return conn


async def _standby_status(conn: q.Conn, pid: int) -> PgStatus:
    pos = await q.standby_position(conn)
    lag_bytes = None
    ahead = pos.upstream_lsn or pos.receive_lsn  # the primary's end of WAL, as last heard
    if ahead is not None and pos.replay_lsn is not None:
        lag_bytes = max(0, ahead - pos.replay_lsn)
    return PgStatus(
        role="standby",
        pid=pid,
        timeline=pos.timeline,
        lsn=pos.replay_lsn,
        receive_lsn=pos.receive_lsn,
        replay_lsn=pos.replay_lsn,
        lag_bytes=lag_bytes,
        lag_s=0.0 if lag_bytes == 0 else pos.replay_age_s,
        streaming=pos.streaming,
        upstream=pos.upstream,
    )


async def _primary_status(conn: q.Conn, pid: int) -> PgStatus:
    pos = await q.primary_position(conn)
    return PgStatus(
        role="primary",
        pid=pid,
        timeline=pos.timeline,
        lsn=pos.lsn,
        synchronous_standby_names=pos.sync_names,
        replicas=tuple(await q.replicas(conn)),
    )
