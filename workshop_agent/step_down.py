"""Stepping down: the active's services stopped first, its key given away after (a
resignation, or a handover to a chosen standby): never two actives. Also the refusal of
a switchover the decision cannot carry out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from hapair.shared import drift, keys
from hapair.shared.clock import Clock
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import NodeStatus, RecordError, decode
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Pair
from hapair.workshop_agent.database import Database
from hapair.workshop_agent.database_care import DatabaseCare
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.observe import PairState
from hapair.workshop_agent.publisher import Publisher
from hapair.workshop_agent.supervisor import Supervisor
from hapair.workshop_agent.vip import VipKeeper

REFUSED_S = 30.0  # a standby that did not confirm a handover is not chosen again meanwhile

Send = Callable[[], Awaitable[int | None]]  # a resign or handover transaction


class StepDowns:
    """``pair``, ``term`` and ``state`` give the pair, the term held and the pair as
    last observed; ``end_term`` ends the term; ``event`` records an event of the pair;
    ``changed`` wakes the loop and the publisher."""

    def __init__(
        self,
        store: Store,
        election: Election,
        pairs: Mirror,
        supervisor: Supervisor,
        vip: VipKeeper,
        database: Database | None,
        db_care: DatabaseCare | None,
        publisher: Publisher,
        clock: Clock,
        log: EventLog,
        *,
        pair: Callable[[], Pair | None],
        term: Callable[[], int | None],
        end_term: Callable[[], object],
        state: Callable[[], PairState | None],
        event: Callable[..., None],
        changed: Callable[[], None],
    ) -> None:
        self.store = store
        self.election = election
        self.pairs = pairs
        self.supervisor = supervisor
        self.vip = vip
        self.database = database
        self.db_care = db_care
        self.publisher = publisher
        self.clock = clock
        self.log = log
        self._pair = pair
        self._term = term
        self._end_term = end_term
        self._state = state
        self._event = event
        self._changed = changed
        self.left_term: int | None = None  # the newest term given up by a step-down
        self._unanswered: Send | None = None  # that step-down, if etcd did not answer
        self.holdoff_until = 0.0  # after a failure, the others have the first chance
        self._refused: dict[str, float] = {}  # handover targets that did not confirm, until
        self._view_lags: str | None = None  # the switchover waiting for a current view

    @property
    def unanswered(self) -> bool:
        return self._unanswered is not None

    def refused(self, now: float) -> frozenset[str]:
        return frozenset(n for n, until in self._refused.items() if until > now)

    def refused_until(self, now: float) -> float:
        """When the next of those refusals is forgiven (inf: none is held against)."""
        return min((until for until in self._refused.values() if until > now), default=float("inf"))

    async def settle(self) -> None:
        """Send again a step-down etcd did not answer."""
        if self._unanswered is not None:
            await self._send(self._unanswered)

    async def step_down(
        self,
        reason: str,
        to: str | None,
        request: str | None,
        planned: bool = True,
        db_lost: bool = False,
    ) -> None:
        """Stop services first, then give the key away: never two actives."""
        pair = self._pair()
        assert pair is not None
        epoch = self._term()
        if epoch is None:
            return
        started = self.clock()
        await self.vip.release()
        await self.supervisor.deactivate()
        lsn = None
        try:
            if self.database is not None and self.db_care is not None:
                self.db_care.stop_loop()
                # A handover hands the database over cleanly, or not at all; a resignation
                # (or a database that cannot run) stops it before another node may
                # promote. The watchdog guards it until it has stopped.
                target = pair.node(to) if to is not None else None
                if target is not None and not db_lost:
                    lsn = await self.database.hand_over(target)
                    if lsn is None:
                        await self._handover_aborted(reason, target.name, request)
                        return
                else:
                    await self.database.demote()
            await self.publisher.withdraw_endpoints()
            if self._term() != epoch:
                return  # fenced while stopping
            await self._give_away(epoch, reason, to, request, planned, lsn, started)
        finally:
            # Whatever ended the step-down, the database is cared for again.
            if self.db_care is not None:
                self.db_care.ensure_loop()

    async def _give_away(
        self,
        epoch: int,
        reason: str,
        to: str | None,
        request: str | None,
        planned: bool,
        lsn: int | None,
        started: float,
    ) -> None:
        """The step-down's etcd half: the key given away, once the services stopped."""
        kind = "resign" if to is None else "switchover"
        send: Send = (
            partial(self.election.resign, epoch)
            if to is None
            else partial(self.election.handover, epoch, to, request, planned, lsn)
        )
        # Sent, the term is over whatever etcd answers (see decide's left_term).
        self.left_term = epoch
        outcome = await self._send(send)
        self._end_term()
        self.log.bind(epoch=None)
        if to is None or not planned:
            # After a failure, give the others the first chance to take over.
            pair = self._pair()
            assert pair is not None
            self.holdoff_until = self.clock() + pair.failover.lease_ttl_s
        stopped_ms = round((self.clock() - started) * 1000)
        self.log.info(
            "stepped down", reason=reason, to=to, outcome=outcome, stop_ms=stopped_ms, epoch=epoch
        )
        if self.db_care is not None:
            self.db_care.restart_loop()
        self._event(kind, reason, to=to, request=request, epoch=epoch)
        self._changed()

    async def _send(self, send: Send) -> str:
        """Send a step-down transaction. Unanswered, it is kept to be sent again (the
        decision asks for that while the old key shows): never an error that would
        leave the term running on a view of etcd that may lag."""
        pair = self._pair()
        assert pair is not None
        try:
            revision = await send()
        except StoreError as err:
            if self._unanswered is None:
                self.log.warning(
                    "etcd did not answer the step-down: the term is over anyway; "
                    "sending it again until etcd answers",
                    error=str(err),
                )
            self._unanswered = send
            return "unanswered"
        self._unanswered = None
        if revision is None:
            return "key no longer ours"
        self.pairs.apply_local(keys.leader(pair.name), None, revision)
        return "done"

    async def _handover_aborted(self, reason: str, to: str, request: str | None) -> None:
        """The target did not receive the final position: the key stays, the database
        loop starts the primary again, then the services start again."""
        self._refused[to] = self.clock() + REFUSED_S
        why = f"the database's final position could not be handed to {to}"
        self.log.error("handover aborted: keeping the pair", to=to, reason=reason, why=why)
        if self.db_care is not None:
            self.db_care.restart_loop()  # first: an etcd error below must not leave it uncared for
        self._event("handover_aborted", why, to=to, cause=reason)
        self._changed()
        state = self._state()
        raw = state.switchover_raw if state else None
        if request is not None and raw is not None:
            self._event("switchover_rejected", why, request=request)
            await self.election.drop_switchover(raw)

    async def reject_switchover(
        self, request: str, reason: str, target: str | None, lacks: bool = False
    ) -> None:
        if target is not None and await self._ready_in_etcd(target, lacks):
            if self._view_lags != request:
                self._view_lags = request
                self.log.info("switchover target ready in etcd; waiting for this view")
            return  # decided again once this node's view of the target catches up
        state = self._state()
        raw = state.switchover_raw if state else None
        if raw is not None:
            await self.election.drop_switchover(raw)
        self.log.warning("switchover refused", request=request, reason=reason)
        self._event("switchover_rejected", reason, request=request)

    async def _ready_in_etcd(self, node: str, lacks: bool) -> bool:
        """Is ``node`` a healthy, undrained standby by a fresh (linearizable) read, and,
        when it was refused for ``lacks``, does it now hold every declared package
        version? Whether a node lacking one may take over depends on what the others
        hold: for any other refusal that is decided again on a current view."""
        kvs, _ = await self.store.get_prefix(f"{keys.NODES_PREFIX}{node}/")
        found = {kv.key: kv for kv in kvs}
        kv = found.get(keys.node_status(node))
        if kv is None or keys.drained(node) in found:
            return False
        try:
            status = decode(NodeStatus, kv.value, kv.key)
        except RecordError:
            return False
        if not status.healthy or status.role != "standby":
            return False
        pair = self._pair()
        return not lacks or pair is None or not drift.lacking(pair, drift.held(status.packages))
