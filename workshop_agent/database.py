"""The pair's PostgreSQL as the agent drives it: primary on the active, standby elsewhere.

Order matters for RPO 0, as in Patroni:
- a new active records itself as the only node holding every commit *before* it
  acknowledges a commit (the old primary lacks what it will write), but only *after* it
  promoted: a failed promotion must leave the old primary eligible;
- the record names a superset of the standbys the primary may wait for, or only the
  primary: a standby joining a recorded one is recorded *before* it is named, and a
  set the record did not contain (the first standby, or fewer than before) is recorded
  only once the primary reports each synchronous and each flushed the primary's
  position of the moment the set was named (see ``_keep_sync``);
- a synchronous standby gone for ``degrade_after_s`` is unrecorded *before* the
  primary stops waiting for it, and never stops being waited for while the record
  cannot be changed.
Only recorded nodes may take over automatically (see ``eligible``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from hapair.shared import keys
from hapair.shared.database import DatabaseConfig
from hapair.shared.log import EventLog
from hapair.shared.records import SyncState
from hapair.shared.store import StoreError
from hapair.shared.topology import Node, Pair
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.pg import hooks
from hapair.workshop_agent.pg.errors import PgError, SecretError
from hapair.workshop_agent.pg.status import PgStatus

if TYPE_CHECKING:
    from hapair.workshop_agent.pg.manager import PgManager

FAILURES_BEFORE_RESIGN = 3
# Test hook, off unless set in the agent's environment: the agent stops itself (SIGSTOP)
# when it has restarted its primary in place, before it passes the new PID on.
STOP_ON_NEW_POSTMASTER = bool(os.environ.get("HAPAIR_TEST_STOP_ON_NEW_POSTMASTER"))
CATCH_UP_S = 10.0
# A clean shutdown waits until every connected standby flushed its last record; this
# only covers the target's answer. One not connected then never receives it.
HANDOVER_RECEIVED_S = 2.0


def eligible(
    config: DatabaseConfig | None,
    record: SyncState | None,
    me: str,
    main: str,
    received: Mapping[str, int | None] | None = None,
) -> bool:
    """May ``me`` take the pair over automatically without losing a commit?

    With several recorded standbys (quorum commit, ``ANY 1 (...)``) a commit may be on
    any one of them alone, so only one that received at least as much WAL as every other
    recorded standby may take over (``received``: node -> received LSN, from their
    status), and only once each of them answered: one that does not may hold commits
    the others lack. The pair then waits (an operator may force a node) rather than
    lose them: the price of quorum commit when the primary and a standby die together.
    """
    if config is None or not config.synchronous:
        return True
    if record is None:
        return me == main  # a new site: the main initialises the cluster
    if not record.holds_everything(me):
        return False
    if me == record.primary or len(record.sync) < 2:
        return True
    if received is None or (mine := received.get(me)) is None:
        return False
    others = [received.get(node) for node in record.sync if node != me]
    return all(lsn is not None and lsn <= mine for lsn in others)


_NAME = re.compile(r'"((?:[^"]|"")*)"|([^\s,()"]+)')


def named_standbys(setting: str | None) -> set[str]:
    """The standbys a ``synchronous_standby_names`` setting lets a commit wait for:
    ``"b"``, ``ANY 1 ("b", "c")`` (``files.sync_names``) or ``FIRST 1 (b, c)``."""
    if not setting:
        return set()
    body = setting
    if "(" in setting:
        body = setting[setting.index("(") + 1 : setting.rindex(")")]
    return {
        quoted.replace('""', '"') if quoted else bare for quoted, bare in _NAME.findall(body)
    } - {""}


class Database:
    def __init__(
        self,
        config: DatabaseConfig,
        pair: Pair,
        node: Node,
        election: Election,
        log: EventLog,
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.pair, self.node = pair, node
        self.election = election
        self.log = log
        self.on_change = on_change
        self.manager: PgManager | None = None
        self.error: str | None = None
        self.primary_epoch: int | None = None  # the term for which this node is primary
        self.failure: str | None = None  # the active cannot run its database: resign
        self.status: PgStatus | None = None
        self._postmaster: int | None = None
        # Told at once of every new postmaster of the primary (the agent's watchdog).
        self.on_postmaster: Callable[[int | None], None] = lambda _pid: None
        # Told before the server may become primary (the agent's watchdog, which kills
        # whatever serves the data directory from then on, until ``on_postmaster(None)``).
        self.on_may_be_primary: Callable[[], None] = lambda: None
        self._failures = 0
        self._sync_missing_since: float | None = None
        self._recorded: SyncState | None = None
        # The standbys named synchronous but not yet recorded as exactly that set, and the
        # primary's flush position once they were, which each must have flushed first.
        self._named_at: tuple[frozenset[str], int] | None = None
        self._reached: int | None = None  # the old primary's final position, replayed

    @property
    def postmaster(self) -> int | None:
        """While primary: the postmaster's PID, which the watchdog kills to fence."""
        return self._postmaster

    @postmaster.setter
    def postmaster(self, pid: int | None) -> None:
        self._postmaster = pid
        self.on_postmaster(pid)

    def open(self) -> None:
        if self.config.security == "none":
            self.log.warning(
                "database in the LAB MODE, NO TLS: the pair's database says security: none, "
                "so replication, the superuser's and the clients' connections go in clear "
                "and nobody checks whom they reach; issue each node a certificate (hapair "
                "pki issue DIR postgres postgres@NODE --ip ADDRESS) and drop security: none",
                port=self.config.port,
            )
        try:
            from hapair.workshop_agent.pg.manager import PgManager

            self.manager = PgManager.open(self.config, self.pair, self.node)
        except (SecretError, PgError) as err:
            self.error = str(err)
            self.log.error("database cannot start", error=self.error)

    @property
    def endpoint_name(self) -> str:
        return f"{self.pair.name}.db"

    # -- the active -------------------------------------------------------------------
    async def become_primary(self, epoch: int, catch_up_lsn: int | None) -> bool:
        """Be primary, then record this node as the only one holding every commit.

        Until the record says so the previous record stands, naming the old primary
        (which has everything) among the nodes that may take over: a promotion that
        fails, and this node dying, must not leave the pair with none. A promoted
        server acknowledges no commit before the record is written (``hold_writes``)."""
        manager = self.manager
        if manager is None:
            self.failure = f"database: {self.error}"
            return False
        if self.primary_epoch == epoch:
            return True
        try:
            if catch_up_lsn is not None and self._reached != catch_up_lsn:
                if not await manager.caught_up(catch_up_lsn, CATCH_UP_S):
                    self.failure = "database: did not catch up with the old primary in time"
                    return False
                self._reached = catch_up_lsn
            # Before the promotion, not once it is seen done: from the moment PostgreSQL
            # takes it, the server may accept writes, and this agent may freeze before it
            # has seen that. Kept until the server has stopped (demote, hand_over).
            self.on_may_be_primary()
            result = await manager.ensure_primary(epoch, hold_writes=True)
        except PgError as err:
            self._failures += 1
            self.log.error("database: could not become primary", error=str(err))
            if self._failures >= FAILURES_BEFORE_RESIGN:
                self.failure = f"database: {err}"
            return False
        if not await self._record(epoch, [], degraded=False):
            return False  # writes stay held; the next round records again
        try:
            if await manager.open_writes():
                self.log.info("database: writes open once recorded as the only complete node")
        except PgError as err:
            self.log.warning("database: could not open writes", error=str(err))
            return False
        try:
            moved = await manager.fence_processes(epoch)
        except PgError as err:
            # No service starts before the fences are up: a held service's context
            # could otherwise be moved by a stale instance while the operator looks.
            self._failures += 1
            self.log.error("database: could not raise the process fences", error=str(err))
            if self._failures >= FAILURES_BEFORE_RESIGN:
                self.failure = f"database: process fences: {err}"
            return False
        self.log.info("process fences raised", moved=moved)
        self._failures = 0
        self.primary_epoch = epoch
        self.postmaster = manager.postmaster_pid()
        self.log.info("database primary", result=str(result))
        self.on_change()
        return True

    async def keep_primary(self, epoch: int, peers_up: set[str]) -> None:
        """On the active, every round: stay primary and keep the sync record true."""
        manager = self.manager
        if manager is None or self.primary_epoch != epoch:
            return
        try:
            await manager.ensure_primary(epoch)
            # A postmaster that crashed was started again just now, with a new PID.
            pid = manager.postmaster_pid()
            if STOP_ON_NEW_POSTMASTER and self.postmaster not in (None, pid):
                os.kill(os.getpid(), signal.SIGSTOP)  # test hook, see above
            self.postmaster = pid
            self.status = await manager.status()
        except PgError as err:
            self._failures += 1
            self.log.error("database: primary unhealthy", error=str(err))
            if self._failures >= FAILURES_BEFORE_RESIGN:
                self.failure = f"database: {err}"
            return
        self._failures = 0
        if self.config.synchronous:
            try:
                await self._keep_sync(manager, epoch, peers_up)
            except PgError as err:
                # The server may have died mid-step: the next round repairs it.
                self.log.warning("database: could not keep the sync state", error=str(err))

    async def _keep_sync(self, manager: PgManager, epoch: int, peers_up: set[str]) -> None:
        """Wait for the standbys that stream, and keep the record true while doing so.

        The invariant, at every moment a commit may be acknowledged: the record names
        (a) only this primary, or (b) a superset of the standbys PostgreSQL may wait
        for (``synchronous_standby_names``), of which only the one that received the
        most, all of them answering, may take over (``eligible``): each commit is on
        one of them, and WAL is contiguous. A set that is not such a superset (growing
        from the primary alone, or shrinking) is recorded only once each of its members
        flushed the primary's position taken after the setting became that set. So the
        record is widened first, then the setting; the setting is narrowed first, then,
        after the flush, the record; the primary never stops waiting while the record
        names a standby; and a record write that fails leaves the setting as it is."""
        assert self.status is not None
        now = time.monotonic()
        # Only a standby really streaming may be waited for: one still starting, or
        # diverged and unable to follow, would block every commit.
        streaming = {
            r.name for r in self.status.replicas if r.name in peers_up and r.state == "streaming"
        }
        sync_now = set(self.status.sync_standbys())
        named = named_standbys(self.status.synchronous_standby_names)
        recorded = set(self._recorded.sync) if self._recorded else set()
        if streaming and streaming != named:
            wider = recorded | streaming
            if recorded and wider != recorded:
                # From the moment the setting names a standby a commit may be on it
                # alone: the record must already name it. Recorded only the primary,
                # it stays so until the newcomers flushed (below).
                if not await self._record(epoch, sorted(wider), degraded=False):
                    return
                recorded = wider
            sync_now = set(await manager.restore_sync(sorted(streaming)))
            hooks.stop_at("after_sync_names")
            named = streaming
        if named and named != recorded and await self._flushed(manager, named, sync_now):
            await self._record(epoch, sorted(named), degraded=False)
        waiting = bool(self.status.synchronous_standby_names)
        if (recorded or waiting) and not sync_now:
            self._sync_missing_since = self._sync_missing_since or now
            if now - self._sync_missing_since >= self.config.degrade_after_s:
                # Unrecord first: from now on the old standby may not take over. While
                # the record may still name it, the primary keeps waiting for it.
                if not await self._record(epoch, [], degraded=True):
                    return
                await manager.degrade_to_async()
                self.log.warning("database degraded to asynchronous: no synchronous standby")
        else:
            self._sync_missing_since = None

    async def _flushed(self, manager: PgManager, named: set[str], sync_now: set[str]) -> bool:
        """Whether each standby in ``named``, the set the primary may wait for now, holds
        every acknowledged commit, so that the record may name exactly that set.

        PostgreSQL calls a standby synchronous as soon as it is named, but commits
        acknowledged before (asynchronously, or by a standby no longer named) may not be
        flushed there yet. As Patroni does, each counts once it flushed the primary's
        position taken after the setting became this set, seen in a later round (every
        backend waits for the new set by then)."""
        assert self.status is not None
        if self._named_at is None or self._named_at[0] != named:
            self._named_at = (frozenset(named), await manager.flush_position())
            return False
        position = self._named_at[1]
        flushed = {r.name: r.flush_lsn for r in self.status.replicas}
        for name in named:
            lsn = flushed.get(name)
            if name not in sync_now or lsn is None or lsn < position:
                return False
        self._named_at = None
        return True

    async def _record(self, epoch: int, sync: list[str], degraded: bool) -> bool:
        """Write the sync record under this term; whether it is written for sure."""
        record = SyncState(primary=self.node.name, sync=sync, degraded=degraded, epoch=epoch)
        try:
            written = await self.election.put_guarded(
                epoch, keys.sync_standby(self.pair.name), record.encode(), None
            )
        except StoreError as err:
            self.log.warning("database: sync record not written", error=str(err))
            return False
        if not written:
            self.log.warning("database: sync record refused: the term is over in etcd")
            return False
        self._recorded = record
        self.log.info("database sync state", sync=",".join(sync) or "none", degraded=degraded)
        return True

    async def hand_over(self, target: Node) -> int | None:
        """Handover: checkpoint and stop; the position ``target`` must reach before it
        promotes, once it has received it. None: the handover must not happen (this node
        is still the pair's primary; the next round starts it again)."""
        manager = self.manager
        if manager is None or self.primary_epoch is None:
            self.log.error("database: no final position to hand over (not primary)")
            return None
        self.primary_epoch = None
        try:
            lsn = await manager.switchover_prepare()
            # Stopped: no longer the watchdog's to kill (it was, had this agent frozen
            # during the checkpoint, while the server still took writes).
            self.postmaster = None
            if await manager.received_by(target.address, lsn, HANDOVER_RECEIVED_S):
                return lsn
            self.log.error(
                "database: the handover target did not receive the final position",
                to=target.name,
                lsn=f"{lsn:X}",
            )
        except PgError as err:
            self.log.error("database: handover preparation failed", error=str(err))
        return None

    async def demote(self) -> None:
        """Fencing: stop now; never waits on anything in flight."""
        self.primary_epoch = None
        self._recorded = None
        self._named_at = None
        try:
            if self.manager is not None:
                with contextlib.suppress(PgError):
                    result = await self.manager.demote()
                    self.log.warning("database demoted", result=str(result))
        finally:
            # Only once stopped: a freeze during the stop leaves it to the watchdog.
            self.postmaster = None

    # -- a standby --------------------------------------------------------------------
    async def follow(self, primary: Node) -> None:
        manager = self.manager
        if manager is None or hooks.held("follow"):
            return
        self.failure = None
        try:
            result = await manager.ensure_standby(primary.address)
            if result.action != "none":
                self.log.info("database standby", result=str(result))
            self.status = await manager.status()
        except PgError as err:
            self.log.warning("database: cannot follow the primary", error=str(err))

    async def refresh_status(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(PgError):
                self.status = await self.manager.status()

    async def close(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(PgError, asyncio.CancelledError):
                await self.manager.close()
