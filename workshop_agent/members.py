"""The pair's member set, as its active acknowledges it in etcd.

A node the active lists may campaign only then; one it dropped no longer may. Until etcd
answers a write of the set, that set may or may not be in etcd: a hold must then have
the promises of its nodes too (``candidates.hold_peers``). A set that adds a node waits
until the term's guard stands without counting on that node's promises (its beats in
etcd, or the node's own promise): from its write on, the node may take the term over by
beat (``candidates.beat_peers``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.store import Kv, StoreError
from hapair.shared.topology import Pair
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.observe import PairObserver

RETRY_S = 0.1  # after a failed write, before the next round may send it again


class MemberSets:
    """``moved`` is called whenever the sets a hold needs may have changed (the fence
    point moves); ``spawn`` runs a write as a task of the agent; ``ready`` says whether
    a set of nodes may be written now (``Beating.covers``)."""

    def __init__(
        self,
        observer: PairObserver,
        pairs: Mirror,
        log: EventLog,
        *,
        moved: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        ready: Callable[[frozenset[str]], bool] = lambda nodes: True,
    ) -> None:
        self.observer = observer
        self.pairs = pairs
        self.log = log
        self._moved = moved
        self._spawn = spawn
        self._ready = ready
        # Member sets this term sent to etcd whose outcome is unknown, and one in flight.
        self._unsure: set[frozenset[str]] = set()
        self._unsure_epoch: int | None = None  # the term they were sent in
        self._writing = False
        self._error: str | None = None  # for logging changes only

    def acknowledged(self, pair: Pair) -> list[frozenset[str] | None]:
        """The member sets etcd may hold for this term: the one this view shows, and
        those sent since whose outcome is unknown."""
        shown, _ = self.observer.members(pair.name, self.pairs.items)
        return [shown, *self._unsure]

    def new_term(self, epoch: int) -> None:
        # A write guarded by an earlier epoch can no longer be applied. One sent in a
        # term taken up again at the same epoch (its own key, after a fence) still can.
        if epoch != self._unsure_epoch:
            self._unsure.clear()
            self._unsure_epoch = epoch

    def step(self, pair: Pair | None, term: int | None, election: Election | None) -> None:
        """As the active, acknowledge the nodes of the topology it runs as the pair's
        members (a node it lists may campaign only then; one it dropped no longer may)."""
        if pair is None or term is None or election is None or self._writing:
            return
        nodes = frozenset(n.name for n in pair.nodes)
        if self.observer.members(pair.name, self.pairs.items)[0] == nodes:
            return
        if not self._ready(nodes):
            return  # a later round writes it, once the term's guard allows
        self._writing = True
        self.new_term(term)  # the loop's term is the one the write is guarded by
        self._unsure.add(nodes)
        self._moved()  # a hold may need more promises now: the fence point moves
        self._spawn(self._write(election, pair.name, term, nodes), "members")

    async def _write(self, election: Election, pair: str, term: int, nodes: frozenset[str]) -> None:
        try:
            written = await election.write_members(term, nodes)
        except StoreError as err:
            if str(err) != self._error:
                self.log.warning("could not acknowledge the pair's members", error=str(err))
            self._error = str(err)
            await asyncio.sleep(RETRY_S)
            return
        finally:
            self._writing = False
        # Answered: etcd holds this set, or the term is over. A set sent earlier whose
        # answer never came was applied before this one or not at all.
        self._unsure.clear()
        self._error = None
        if written is not None:
            value, revision = written
            key = keys.members(pair)
            self.pairs.apply_local(key, Kv(key, value, revision, revision, 0), revision)
            self.log.info("pair members acknowledged", members=",".join(sorted(nodes)))
        self._moved()  # the promises the hold needs may be fewer now
