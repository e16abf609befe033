"""The pair election, shaped like etcd's own concurrency API (the lease it rides on is
:class:`shared.lease.Session`).

:class:`Election` holds every write that changes who is active. Each is one etcd
transaction guarded by the leader key's create_revision (the epoch), so a stale agent
can never move the pair.
"""

from __future__ import annotations

from collections.abc import Collection

from shared import keys
from shared.records import Handover, Leader, Members
from shared.store import Store


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
