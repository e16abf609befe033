"""The lease session and the pair election, shaped like etcd's own concurrency API.

:class:`Session` owns the agent's lease and knows, on ``CLOCK_BOOTTIME`` (unlike the
monotonic clock it goes on during a suspend), until when the agent may still act as
active: the *fence point*, measured from the moment the last acknowledged keepalive was
**sent** (etcd restarts its TTL when it receives it, which is later, so the agent always
stops first).

:class:`Election` holds every write that changes who is active. Each is one etcd
transaction guarded by the leader key's create_revision (the epoch), so a stale agent
can never move the pair.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from shared import keys
from shared.clock import boottime
from shared.log import EventLog
from shared.records import Handover, Leader, Members
from shared.store import Store, StoreError

Clock = Callable[[], float]


class Session:
    """The agent's lease. ``valid(now)`` is the one test of whether it may act."""

    def __init__(
        self,
        store: Store,
        ttl: float,
        fence_after: float,
        log: EventLog,
        clock: Clock = boottime,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        # Timings of the lease held now, and those the next grant will use: a lease keeps
        # the TTL it was granted with, so its fence point must too.
        self.ttl = self.wanted_ttl = ttl
        self.fence_after = self.wanted_fence_after = fence_after
        self.may_regrant: Callable[[], bool] = lambda: False
        self.log = log
        self.clock = clock
        self.on_change = on_change
        self.lease: int | None = None
        self.acked_send: float | None = None
        self.renewed = asyncio.Event()

    @property
    def interval(self) -> float:
        return self.ttl / 4

    def valid(self, now: float) -> bool:
        return (
            self.lease is not None
            and self.acked_send is not None
            and (now < self.acked_send + self.fence_after)
        )

    @property
    def fence_deadline(self) -> float:
        """When the agent must have stopped its services (``-inf`` without a lease)."""
        return -float("inf") if self.acked_send is None else self.acked_send + self.fence_after

    def retune(self, ttl: float, fence_after: float) -> None:
        """New timings apply from the next grant; a shorter fence point applies at once.

        The next grant comes as soon as ``may_regrant()`` allows (the agent holds no term),
        or when the lease is lost."""
        self.wanted_ttl, self.wanted_fence_after = ttl, fence_after
        self.fence_after = min(self.fence_after, fence_after)

    async def _regrant_if_retuned(self) -> None:
        retuned = (self.wanted_ttl, self.wanted_fence_after) != (self.ttl, self.fence_after)
        if self.lease is not None and retuned and self.may_regrant():
            old, self.lease, self.acked_send = self.lease, None, None
            self.on_change()
            self.log.info("new lease timings: taking a new lease", ttl=self.wanted_ttl)
            await self.store.revoke(old)

    async def run(self) -> None:
        failing: str | None = None
        while True:
            sent = self.clock()
            try:
                await self._regrant_if_retuned()
                if self.lease is None:
                    self.ttl, self.fence_after = self.wanted_ttl, self.wanted_fence_after
                    self.lease = await self.store.grant(self.ttl)
                    self._acked(sent)
                    self.log.info("lease granted", lease=f"{self.lease:x}", ttl=self.ttl)
                else:
                    granted = await self.store.keepalive(self.lease)
                    if granted <= 0:
                        self.log.warning("lease lost", lease=f"{self.lease:x}")
                        self.lease, self.acked_send = None, None
                        self.on_change()
                        continue
                    self._acked(sent)
                if failing:
                    self.log.info("etcd reachable again")
                    failing = None
            except StoreError as err:
                if failing != str(err):
                    self.log.warning("lease keepalive failed", error=str(err))
                failing = str(err)
            await asyncio.sleep(max(0.0, sent + self.interval - self.clock()))

    def _acked(self, sent: float) -> None:
        if self.acked_send is None or sent > self.acked_send:
            self.acked_send = sent
            self.log.debug("lease confirmed", sent=repr(sent))
        self.renewed.set()
        self.on_change()

    async def close(self) -> None:
        lease, self.lease, self.acked_send = self.lease, None, None
        if lease is not None:
            # If revoking takes longer than the TTL, the lease has expired anyway.
            try:
                await self.store.revoke(lease)
            except StoreError as err:
                self.log.warning("lease revoke failed", error=str(err))


class Election:
    """Every ownership change of one pair, each a transaction on the leader key."""

    def __init__(self, store: Store, pair: str, node: str) -> None:
        self.store = store
        self.pair = pair
        self.node = node
        self.key = keys.b(keys.leader(pair))
        self.handover_key = keys.b(keys.handover(pair))
        self.switchover_key = keys.b(keys.switchover(pair))
        self.takeover_key = keys.b(keys.takeover(pair))
        self.members_key = keys.b(keys.members(pair))

    async def campaign(
        self,
        lease: int,
        handover_revision: int | None = None,
        target: bool = False,
        members: Collection[str] | None = None,
        members_revision: int = 0,
    ) -> int | None:
        """Take the leader key if nobody holds it; the new epoch, or None if we lost.

        Unless this node is the named handover target, a live handover record blocks
        the campaign; a stale one (seen at ``handover_revision``) does not. The member
        set the decision read (at ``members_revision``, 0: none) must be unchanged, and
        ``members`` (this node's topology) becomes the new term's member set with it
        (the agent always gives it; without, the member set is left as it is).
        """
        tx = self.store.tx
        compare = [tx.create(self.key) == 0]
        writes = []
        if members is not None:
            compare.append(tx.mod(self.members_key) == members_revision)
            writes.append(tx.put(self.members_key, Members(nodes=sorted(members)).encode()))
        if not target:
            compare.append(
                tx.mod(self.handover_key) == handover_revision
                if handover_revision is not None
                else tx.version(self.handover_key) == 0
            )
        ok, resp = await self.store.txn(
            compare,
            [
                tx.put(self.key, Leader(node=self.node).encode(), lease=lease),
                tx.delete(self.handover_key),
                # A forced takeover is for this election only, whoever wins it.
                tx.delete(self.takeover_key),
                *writes,
            ],
        )
        return int(resp[0].response_put.header.revision) if ok else None

    async def resign(self, epoch: int) -> int | None:
        """Delete our leader key; the revision of the delete, or None if it was not ours."""
        tx = self.store.tx
        ok, resp = await self.store.txn([tx.create(self.key) == epoch], [tx.delete(self.key)])
        return int(resp[0].response_delete_range.header.revision) if ok else None

    async def handover(
        self,
        epoch: int,
        to: str,
        request: str | None,
        planned: bool = True,
        lsn: int | None = None,
    ) -> int | None:
        """Step down in favour of ``to``: only it may campaign until the record is stale."""
        tx = self.store.tx
        record = Handover(
            from_node=self.node, to=to, epoch=epoch, request=request, planned=planned, lsn=lsn
        )
        ok, resp = await self.store.txn(
            [tx.create(self.key) == epoch],
            [
                tx.delete(self.key),
                tx.delete(self.switchover_key),
                tx.put(self.handover_key, record.encode()),
            ],
        )
        return int(resp[0].response_delete_range.header.revision) if ok else None

    async def drop_switchover(self, raw: bytes) -> None:
        """Delete a switchover request, only if it is still the one we judged."""
        tx = self.store.tx
        await self.store.txn(
            [tx.value(self.switchover_key) == raw], [tx.delete(self.switchover_key)]
        )

    async def reclaim(self, epoch: int, lease: int) -> int | None:
        """Take back a leader key left by an earlier run of this node.

        The key is deleted together with a handover to ourselves, so the standbys wait
        while we campaign again; the old lease (with the old status and endpoints) goes.
        """
        tx = self.store.tx
        record = Handover(
            from_node=self.node, to=self.node, epoch=epoch, request="reclaim", planned=False
        )
        ok, resp = await self.store.txn(
            [tx.create(self.key) == epoch],
            [tx.delete(self.key), tx.put(self.handover_key, record.encode())],
        )
        await self.store.revoke(lease)
        return int(resp[0].response_delete_range.header.revision) if ok else None

    async def put_guarded(self, epoch: int, key: str, value: bytes, lease: int | None) -> bool:
        """Write ``key`` only while ``epoch`` is still the current term."""
        tx = self.store.tx
        ok, _ = await self.store.txn(
            [tx.create(self.key) == epoch], [tx.put(keys.b(key), value, lease=lease)]
        )
        return ok

    async def write_members(self, epoch: int, members: Collection[str]) -> tuple[bytes, int] | None:
        """Acknowledge ``members`` as the pair's nodes while ``epoch`` is the current term:
        the value and revision written, or None if the term is over."""
        tx = self.store.tx
        value = Members(nodes=sorted(members), epoch=epoch).encode()
        ok, resp = await self.store.txn(
            [tx.create(self.key) == epoch], [tx.put(self.members_key, value)]
        )
        return (value, int(resp[0].response_put.header.revision)) if ok else None

    async def delete_if(self, key: str, value: bytes) -> None:
        tx = self.store.tx
        await self.store.txn([tx.value(keys.b(key)) == value], [tx.delete(keys.b(key))])
