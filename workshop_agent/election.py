"""The pair election, shaped like etcd's own concurrency API (the lease it rides on is
:class:`hapair.shared.lease.Session`).

:class:`Election` holds every write that changes who is active. Each is one etcd
transaction guarded by the leader key's create_revision (the epoch), so a stale agent
can never move the pair.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hapair.shared import keys
from hapair.shared.records import HandoverRecord, Leader, Members
from hapair.shared.store import Store
from hapair.shared.txn import Compare, Op


class Election:
    """Every ownership change of one pair, each a transaction on the leader key."""

    def __init__(self, store: Store, pair: str, node: str) -> None:
        self.store = store
        self.pair = pair
        self.node = node
        self.key = keys.leader(pair)
        self.handover_key = keys.handover(pair)
        self.switchover_key = keys.switchover(pair)
        self.takeover_key = keys.takeover(pair)
        self.members_key = keys.members(pair)

    async def campaign(
        self,
        lease: int,
        handover_revision: int | None = None,
        target: bool = False,
        members: Collection[str] | None = None,
        members_revision: int = 0,
        also: Sequence[Op] = (),
    ) -> int | None:
        """Take the leader key if nobody holds it; the new epoch, or None if we lost.

        Unless this node is the named handover target, a live handover record blocks
        the campaign; a stale one (seen at ``handover_revision``) does not. The member
        set the decision read (at ``members_revision``, 0: none) must be unchanged, and
        ``members`` (this node's topology) becomes the new term's member set with it
        (the agent always gives it; without, the member set is left as it is). ``also``:
        further writes of the term's first revision (its first beat).
        """
        compare = [Compare.absent(self.key)]
        writes = []
        if members is not None:
            compare.append(Compare.modified(self.members_key, members_revision))
            writes.append(Op.put(self.members_key, Members(nodes=sorted(members)).encode()))
        if not target:
            compare.append(
                Compare.modified(self.handover_key, handover_revision)
                if handover_revision is not None
                else Compare.absent(self.handover_key)
            )
        result = await self.store.txn(
            compare,
            [
                Op.put(self.key, Leader(node=self.node).encode(), lease=lease),
                Op.delete(self.handover_key),
                # A forced takeover is for this election only, whoever wins it.
                Op.delete(self.takeover_key),
                *writes,
                *also,
            ],
        )
        return result.revision if result.succeeded else None

    async def resign(self, epoch: int) -> int | None:
        """Delete our leader key; the revision of the delete, or None if it was not ours."""
        result = await self.store.txn([Compare.created(self.key, epoch)], [Op.delete(self.key)])
        return result.revision if result.succeeded else None

    async def handover(
        self,
        epoch: int,
        to: str,
        request: str | None,
        planned: bool = True,
        lsn: int | None = None,
    ) -> int | None:
        """Step down in favour of ``to``: only it may campaign until the record is stale."""
        record = HandoverRecord(
            from_node=self.node, to=to, epoch=epoch, request=request, planned=planned, lsn=lsn
        )
        result = await self.store.txn(
            [Compare.created(self.key, epoch)],
            [
                Op.delete(self.key),
                Op.delete(self.switchover_key),
                Op.put(self.handover_key, record.encode()),
            ],
        )
        return result.revision if result.succeeded else None

    async def drop_switchover(self, raw: bytes) -> None:
        """Delete a switchover request, only if it is still the one we judged."""
        await self.delete_if(self.switchover_key, raw)

    async def reclaim(self, epoch: int, lease: int) -> int | None:
        """Take back a leader key left by an earlier run of this node.

        The key is deleted together with a handover to ourselves, so the standbys wait
        while we campaign again; the old lease (with the old status and endpoints) goes.
        """
        revision = await self.to_self(epoch, "reclaim", planned=False)
        await self.store.revoke(lease)
        return revision

    async def to_self(self, epoch: int, request: str, planned: bool) -> int | None:
        """Give term ``epoch``, this node's, up to this node: its leader key deleted with
        a handover to it, so the standbys wait while it campaigns for a new term. None:
        ``epoch`` is no longer the term in etcd. ``planned``: the new term holds no
        service for an operator (an agent's restart does: it may have been a crash)."""
        record = HandoverRecord(
            from_node=self.node, to=self.node, epoch=epoch, request=request, planned=planned
        )
        result = await self.store.txn(
            [Compare.created(self.key, epoch)],
            [Op.delete(self.key), Op.put(self.handover_key, record.encode())],
        )
        return result.revision if result.succeeded else None

    async def put_guarded(self, epoch: int, key: str, value: bytes, lease: int | None) -> bool:
        """Write ``key`` only while ``epoch`` is still the current term."""
        result = await self.store.txn(
            [Compare.created(self.key, epoch)], [Op.put(key, value, lease=lease)]
        )
        return result.succeeded

    async def write_members(self, epoch: int, members: Collection[str]) -> tuple[bytes, int] | None:
        """Acknowledge ``members`` as the pair's nodes while ``epoch`` is the current term:
        the value and revision written, or None if the term is over."""
        value = Members(nodes=sorted(members), epoch=epoch).encode()
        result = await self.store.txn(
            [Compare.created(self.key, epoch)], [Op.put(self.members_key, value)]
        )
        return (value, result.revision) if result.succeeded else None

    async def delete_if(self, key: str, value: bytes) -> None:
        """Delete ``key`` only if it still holds ``value``."""
        await self.store.txn([Compare.value(key, value)], [Op.delete(key)])
