"""The transaction words of :mod:`hapair.shared.txn`, against a real etcd: each compare when it
holds and when it does not, puts (with and without a lease), deletes, and the revision
a transaction reports."""

from __future__ import annotations

import pytest

from hapair.shared import keys
from hapair.shared.store import Store
from hapair.shared.txn import Compare, Op

KEY = keys.leader("p")
OTHER = keys.paused("p")
MARK = keys.drained("n")


async def applied(store: Store, compare: Compare) -> bool:
    """Whether ``compare`` held: its success writes MARK, its failure deletes it."""
    await store.put(MARK, b"before")
    result = await store.txn([compare], [Op.put(MARK, b"success")], [Op.delete(MARK)])
    kv = await store.get(MARK)
    assert (kv is not None and kv.value == b"success") == result.succeeded
    assert (kv is None) == (not result.succeeded), "the failure branch ran otherwise"
    return result.succeeded


async def test_created(store: Store) -> None:
    first = await store.put(KEY, b"a")
    await store.put(KEY, b"b")  # a later write keeps the create revision
    assert await applied(store, Compare.created(KEY, first))
    assert not await applied(store, Compare.created(KEY, first + 1))
    assert not await applied(store, Compare.created(OTHER, first))
    assert await applied(store, Compare.created(OTHER, 0)), "absent: created at 0"


async def test_modified(store: Store) -> None:
    first = await store.put(KEY, b"a")
    second = await store.put(KEY, b"b")
    assert await applied(store, Compare.modified(KEY, second))
    assert not await applied(store, Compare.modified(KEY, first))
    assert await applied(store, Compare.modified(OTHER, 0)), "absent: modified at 0"
    assert not await applied(store, Compare.modified(KEY, 0))


async def test_value(store: Store) -> None:
    await store.put(KEY, b"a")
    assert await applied(store, Compare.value(KEY, b"a"))
    assert not await applied(store, Compare.value(KEY, b"b"))
    assert not await applied(store, Compare.value(OTHER, b"")), "never true when absent"


async def test_absent(store: Store) -> None:
    assert await applied(store, Compare.absent(KEY))
    await store.put(KEY, b"")
    assert not await applied(store, Compare.absent(KEY)), "an empty value is a key"
    await store.delete(KEY)
    assert await applied(store, Compare.absent(KEY))


async def test_all_compares_must_hold(store: Store) -> None:
    await store.put(KEY, b"a")
    result = await store.txn([Compare.value(KEY, b"a"), Compare.absent(KEY)], [Op.put(OTHER, b"x")])
    assert not result.succeeded
    assert await store.get(OTHER) is None


async def test_put_reports_its_revision(store: Store) -> None:
    result = await store.txn([Compare.absent(KEY)], [Op.put(KEY, b"a"), Op.put(OTHER, b"b")])
    assert result.succeeded
    kv, other = await store.get(KEY), await store.get(OTHER)
    assert kv is not None and other is not None
    assert kv.value == b"a" and kv.lease == 0
    # One transaction, one revision: the epoch of a leader key taken this way.
    assert result.revision == kv.create_revision == kv.mod_revision == other.mod_revision


async def test_put_with_lease(store: Store) -> None:
    lease = await store.grant(30)
    result = await store.txn([], [Op.put(KEY, b"a", lease=lease)])
    kv = await store.get(KEY)
    assert kv is not None and kv.lease == lease and kv.mod_revision == result.revision
    await store.revoke(lease)
    assert await store.get(KEY) is None, "the key goes with its lease"


async def test_delete(store: Store) -> None:
    await store.put(KEY, b"a")
    await store.put(OTHER, b"b")
    result = await store.txn([Compare.value(KEY, b"a")], [Op.delete(KEY)])
    assert result.succeeded
    assert await store.get(KEY) is None
    assert await store.get(OTHER) is not None, "only the key named"
    assert await store.put(OTHER, b"c") == result.revision + 1, "the delete's revision"


async def test_delete_of_absent_key_writes_nothing(store: Store) -> None:
    before = await store.put(OTHER, b"b")
    result = await store.txn([], [Op.delete(KEY)])
    assert result.succeeded and result.revision == before


@pytest.mark.parametrize(
    "compare",
    [Compare(KEY, "create", b"1"), Compare(KEY, "value", 1), Compare(KEY, "mod", b"")],
)
async def test_mismatched_compare_is_refused_before_sending(store: Store, compare: Compare) -> None:
    with pytest.raises(TypeError):
        await store.txn([compare], [Op.put(OTHER, b"x")])
    assert await store.get(OTHER) is None


async def test_delete_says_whether_the_key_was_there(store: Store) -> None:
    """etcd's answer to deleting a missing key carries no deleted count at all here."""
    await store.put("/t/del", b"x")
    assert await store.delete("/t/del") is True
    assert await store.delete("/t/del") is False
