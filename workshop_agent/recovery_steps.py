"""The stateful steps of assisted recovery: the active's ``/pairs/{pair}/recovery``
record written, the held services' contexts read once, the held services started once
acknowledged. What is held and when it may start are the pure helpers of
``recovery.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from hapair.shared import keys
from hapair.shared.clock import Clock
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import RecordError, Recovery, decode
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Pair
from hapair.workshop_agent import recovery
from hapair.workshop_agent.database import Database
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.supervisor import Supervisor

if TYPE_CHECKING:
    from hapair.workshop_agent.pg.manager import PgManager

WRITE_TRIES = 50  # etcd may be slow to answer right after a failover
WRITE_RETRY_S = 0.2


class RecoverySteps:
    """``pair`` and ``term`` give the pair and the term as they are now; ``event``
    records an event of the pair; ``spawn`` runs a coroutine as a task of the agent."""

    def __init__(
        self,
        store: Store,
        election: Election,
        pairs: Mirror,
        supervisor: Supervisor,
        database: Database | None,
        clock: Clock,
        log: EventLog,
        *,
        pair: Callable[[], Pair | None],
        term: Callable[[], int | None],
        event: Callable[..., None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self.store = store
        self.election = election
        self.pairs = pairs
        self.supervisor = supervisor
        self.database = database
        self.clock = clock
        self.log = log
        self._pair = pair
        self._term = term
        self._event = event
        self._spawn = spawn
        self._held_since = 0.0
        self._contexts_term: int | None = None  # the term whose held contexts were read

    def began(self, now: float) -> None:
        """A term began: the services it holds have waited since ``now``."""
        self._held_since = now

    def record(self) -> Recovery | None:
        pair = self._pair()
        assert pair is not None
        kv = self.pairs.items.get(keys.recovery(pair.name))
        if kv is None:
            return None
        try:
            return decode(Recovery, kv.value, kv.key)
        except RecordError:
            return None

    def held_after_election(self, planned: bool, previous: str | None) -> frozenset[str]:
        """The services a term just won holds for an operator."""
        pair = self._pair()
        assert pair is not None
        # After an unplanned failover the process functions marked hold_until_ack wait
        # for an operator; so they do if an earlier recovery was still awaiting one.
        awaiting = self.record()
        hold = (not planned and previous is not None) or (
            awaiting is not None and awaiting.state == "awaiting"
        )
        return recovery.held_services(pair, hold)

    def await_operator(
        self, epoch: int, cause: str, previous: str | None, me: str, held: frozenset[str]
    ) -> None:
        """Record that the services ``held`` by the term ``epoch`` await an operator."""
        if held:
            record = Recovery(
                epoch=epoch, cause=cause, from_node=previous, to_node=me, held=sorted(held)
            )
            self.write(epoch, record)

    def write(self, epoch: int, record: Recovery, name: str = "recovery") -> None:
        self._spawn(self._write(epoch, record), name)

    async def _write(self, epoch: int, record: Recovery) -> None:
        pair = self._pair()
        assert pair is not None
        for _ in range(WRITE_TRIES):
            try:
                written = await self.election.put_guarded(
                    epoch, keys.recovery(pair.name), record.encode(), None
                )
            except StoreError:
                await asyncio.sleep(WRITE_RETRY_S)
                continue
            if written:
                self.log.warning(
                    "awaiting operator" if record.state == "awaiting" else "recovery acknowledged",
                    held=",".join(record.held),
                    cause=record.cause,
                    by=record.acked_by,
                )
                kind = "recovery_awaiting" if record.state == "awaiting" else "ack"
                self._event(kind, record.cause, held=record.held, by=record.acked_by)
            return

    def _read_contexts_once(self, term: int, current: Recovery | None) -> None:
        """Once per holding term, when this node's database is its primary: read where
        each held service would resume and add it to the recovery record."""
        db, pair = self.database, self._pair()
        if (
            db is None
            or db.manager is None
            or pair is None
            or db.primary_epoch != term
            or current is None
            or current.epoch != term
            or current.contexts is not None
            or self._contexts_term == term
        ):
            return
        self._contexts_term = term
        names = recovery.process_names(pair, current.held)
        self._spawn(self._publish_contexts(term, db.manager, names), "process-contexts")

    async def _publish_contexts(self, term: int, manager: PgManager, names: dict[str, str]) -> None:
        pair = self._pair()
        assert pair is not None
        contexts = await recovery.read_contexts(manager, names)
        try:
            written = await recovery.publish_contexts(self.store, pair.name, term, contexts)
        except StoreError as err:
            self._contexts_term = None  # read them again on a later round
            self.log.warning("could not publish the held services' contexts", error=str(err))
            return
        if written:
            self.log.info(
                "held services would resume from",
                contexts="; ".join(recovery.describe(c) for c in contexts.values()),
            )

    def due(self) -> float:
        """When the next held service's ``auto_ack_after_s`` is up (inf: none waits for it)."""
        pair = self._pair()
        if pair is None or self._term() is None or not self.supervisor.held:
            return float("inf")
        return recovery.release_at(pair, self.supervisor.held, self._held_since)

    def step(self) -> None:
        """Start held services once acknowledged, or when their auto_ack_after_s is up."""
        sup, pair, term = self.supervisor, self._pair(), self._term()
        if pair is None or term is None or not sup.held:
            return
        current = self.record()
        self._read_contexts_once(term, current)
        waited = self.clock() - self._held_since
        due = recovery.release_due(pair, frozenset(sup.held), current, term, waited)
        if not due:
            return
        self.log.info("releasing held services", services=",".join(sorted(due)))
        sup.release(set(due))
        if (
            not sup.held
            and current is not None
            and current.epoch == term
            and (current.state == "awaiting")
        ):
            done = current.model_copy(
                update={"state": "acknowledged", "acked_by": "auto", "acked_at": time.time()}
            )
            self.write(term, done, "auto-ack")
