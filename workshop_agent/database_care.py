"""The agent's care of its node's database (``database.py`` manages the server itself).

One loop at a time keeps the database primary on the active (promoted before any
service starts) and a standby elsewhere; a fence demotes it whatever that loop is
doing; the watchdog guards a primary's postmaster should the agent freeze. The
functions at the end read what the decision needs of the pair's sync record and of the
nodes' published database status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.records import NodeStatus, RecordError, SyncState, decode_shared
from hapair.shared.store import Kv, StoreError
from hapair.shared.topology import Pair
from hapair.shared.waits import wait_event
from hapair.workshop_agent.database import Database, eligible
from hapair.workshop_agent.observe import PairState
from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.status import parse_lsn
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.watchdog import WatchdogLink

ROUND_S = 0.5


class DatabaseCare:
    """``term`` gives the term this node holds now; ``state`` the pair as last observed;
    ``may_run`` whether active-only services may start now; ``held`` the services this
    term holds for an operator; ``changed`` wakes the loop and the publisher, ``dirty``
    the publisher alone; ``spawn`` runs a coroutine as a task of the agent."""

    def __init__(
        self,
        database: Database,
        supervisor: Supervisor,
        watchdog: WatchdogLink,
        log: EventLog,
        me: str,
        *,
        pair: Callable[[], Pair | None],
        term: Callable[[], int | None],
        state: Callable[[], PairState | None],
        may_run: Callable[[], bool],
        held: Callable[[], frozenset[str]],
        changed: Callable[[], None],
        dirty: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self.database = database
        self.supervisor = supervisor
        self.watchdog = watchdog
        self.log = log
        self.me = me
        self._pair = pair
        self._term = term
        self._state = state
        self._may_run = may_run
        self._held = held
        self._changed = changed
        self._dirty = dirty
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._guarded_pg: int | None = None
        self.demoting = 0  # fence-time demotions of the database still running
        self.catch_up_lsn: int | None = None  # the old primary's final position, to reach
        database.on_postmaster = self.guard_postmaster
        database.on_may_be_primary = self.guard_data_dir

    def start(self) -> None:
        self.database.open()
        self._task = asyncio.create_task(self._loop(), name="database")

    def ready(self, term: int | None) -> bool:
        return self.database.primary_epoch == term

    def stopped(self) -> bool:
        """Not primary for any term, and no fence-time demotion still running."""
        return self.database.primary_epoch is None and not self.demoting

    def wake(self) -> None:
        self._wake.set()

    def guard_postmaster(self, pid: int | None) -> None:
        """A primary's postmaster is killed by the watchdog too if this agent freezes:
        by its PID, and whichever serves the data directory then (one restarted in place
        before its PID reaches this method)."""
        manager = self.database.manager
        if pid is not None:
            self.guard_data_dir()
        elif manager is not None:
            self.watchdog.remove_data_dir(manager.layout.data_dir)
        if self._guarded_pg is not None and self._guarded_pg != pid:
            self.watchdog.remove(self._guarded_pg)
        if pid is not None:  # again for the same PID: it may be another server's by now
            self.watchdog.add(pid)
        self._guarded_pg = pid

    def guard_data_dir(self) -> None:
        """From before a promotion: the watchdog kills whichever postmaster serves the data
        directory, until the server has stopped (``guard_postmaster(None)``)."""
        if self.database.manager is not None:
            self.watchdog.add_data_dir(self.database.manager.layout.data_dir)

    def fence(self) -> None:
        """Whatever the database step in flight, it must not start the server again."""
        self.stop_loop()
        self._spawn(self._demote(), "database-demote")

    async def _demote(self) -> None:
        self.demoting += 1
        try:
            await self.database.demote()  # unguarded by the watchdog once stopped
        finally:
            self.demoting -= 1
        self.restart_loop()

    def stop_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def ensure_loop(self) -> None:
        """The database is cared for again, unless a loop already runs."""
        if self._task is None or self._task.done():
            self.restart_loop()

    def restart_loop(self) -> None:
        """One database loop at a time: a fence and a step-down may both end one, and a
        second loop left running could start the server again after a later fence."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.create_task(self._loop(), name="database")

    async def _loop(self) -> None:
        """Primary on the active (promoted before any service starts), standby elsewhere."""
        while True:
            try:
                await self._round()
            except (StoreError, OSError, PgError) as err:
                self.log.warning("database round failed", error=str(err))
            except Exception as err:  # a bug must not end the database's care for good
                self.log.exception("database round failed", err)
            self._dirty()
            await wait_event(self._wake, ROUND_S)
            self._wake.clear()

    async def _round(self) -> None:
        db, sup, pair = self.database, self.supervisor, self._pair()
        assert pair is not None
        term = self._term()
        st = self._state()
        failure = db.failure
        try:
            await self._care(db, sup, pair, term, st)
        finally:
            # A failure declared or cleared is news for the decision (``db_failure``: the
            # active hands the pair to the synchronous standby), which has no instant of
            # its own to wake on.
            if db.failure != failure:
                self._changed()

    async def _care(
        self,
        db: Database,
        sup: Supervisor,
        pair: Pair,
        term: int | None,
        st: PairState | None,
    ) -> None:
        if term is not None and db.primary_epoch != term:
            promoted = await db.become_primary(term, self.catch_up_lsn)
            if promoted:
                self.catch_up_lsn = None  # reached; a restart in place has none to reach
            if promoted and self._term() == term and self._may_run():
                self.guard_postmaster(db.postmaster)
                sup.activate(term, self._held())
            self._changed()
        elif term is not None:
            up = {n for n, peer in (st.peers.items() if st else []) if peer.role == "standby"}
            await db.keep_primary(term, up)
        elif st is not None and st.leader is not None and st.leader.node != self.me:
            primary = pair.node(st.leader.node)
            if primary is not None:
                await db.follow(primary)
        else:
            await db.refresh_status()


# ---- what the decision reads of the pair's databases -----------------------------------


def sync_record(pair: Pair, pairs: Mapping[str, Kv]) -> SyncState | None:
    kv = pairs.get(keys.sync_standby(pair.name))
    if kv is not None:
        with contextlib.suppress(RecordError):
            return decode_shared(SyncState, kv.value, kv.key)
    return None


def db_eligible(
    pair: Pair,
    me: str,
    pairs: Mapping[str, Kv],
    nodes: Mapping[str, Kv],
    database: Database | None,
) -> bool:
    return eligible(
        pair.database,
        sync_record(pair, pairs),
        me,
        pair.nodes[0].name,
        received(pair, me, nodes, database),
    )


def db_sync(pair: Pair, me: str, pairs: Mapping[str, Kv]) -> frozenset[str]:
    """The other nodes recorded as holding every commit: the synchronous standbys,
    and the recorded primary when it is not this node (a new active that cannot
    promote hands the pair back to it)."""
    record = sync_record(pair, pairs)
    if record is None:
        return frozenset()
    sync = set() if record.degraded else set(record.sync)
    return frozenset((sync | {record.primary}) - {me})


def received(
    pair: Pair, me: str, nodes: Mapping[str, Kv], database: Database | None
) -> dict[str, int | None]:
    """Each node's received WAL position, from its published database status; None
    while it still streams: it may have received more since it published (and
    acknowledged commits another standby lacks), so only its final one counts."""
    out: dict[str, int | None] = {}
    for n in pair.nodes:
        kv = nodes.get(keys.node_status(n.name))
        try:
            status = decode_shared(NodeStatus, kv.value, kv.key) if kv is not None else None
            db = (status.database or {}) if status else {}
            lsn = None if db.get("streaming") else db.get("receive_lsn")
            out[n.name] = parse_lsn(lsn) if isinstance(lsn, str) else None
        except (RecordError, ValueError):
            out[n.name] = None
    if database is not None and database.status is not None:
        out[me] = database.status.receive_lsn
    return out
