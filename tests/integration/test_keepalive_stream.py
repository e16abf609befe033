"""Lease keepalives on one stream per lease, against a real etcd.

Each keepalive is sent on the lease's open ``LeaseKeepAlive`` stream; a stream that broke
is opened again, and one whose answer did not come in time is dropped, so that an answer
is only ever read as the answer to the request it belongs to. Streams are counted twice:
by the store (``Store.streams``) and by etcd itself (its ``grpc_server_started_total``).

The tests run an etcd of their own: one of them restarts it; two run three members and
kill one.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.store import LeaseNotFound, Store, StoreError, Timeout
from tests.support.cluster import until
from tests.support.etcd_relay import EtcdRelay
from tests.support.harness import Etcd, EtcdCluster
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd

TTL_S = 10  # far longer than any test step: the lease lives unless revoked
TIMEOUT_S = 0.5  # the store's deadline for each call in these tests
LATE_S = 3 * TIMEOUT_S  # an answer this late is past the deadline by far
BACK_WITHIN_S = 30.0  # generous: etcd restarts and is reached again in a few seconds
CLOSED_WITHIN_S = 10.0  # generous: etcd counts a stream ended as soon as it sees the end
# etcd's own count of the keepalive streams it accepted, and of those that ended (one
# line per status code).
STARTED = re.compile(
    r'^grpc_server_started_total\{grpc_method="LeaseKeepAlive",[^}]*\} (\d+)', re.M
)
ENDED = re.compile(
    r'^grpc_server_handled_total\{[^}]*grpc_method="LeaseKeepAlive",[^}]*\} (\d+)', re.M
)


@pytest.fixture(scope="module")
def own_etcd(test_pki: TestPki) -> Iterator[Etcd]:
    server = TlsEtcd(test_pki.dir, ADMIN)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def store(own_etcd: Etcd) -> AsyncIterator[Store]:
    s = Store(own_etcd.url, timeout=2.0, tls=own_etcd.tls)
    try:
        yield s
    finally:
        await s.close()


def etcd_counts(etcd: Etcd) -> tuple[int, int]:
    """How many keepalive streams etcd has accepted since it started, and how many of
    them have ended (its own counts)."""
    assert etcd.tls is not None
    with urllib.request.urlopen(
        f"{etcd.url}/metrics", context=etcd.tls.client_context(), timeout=5
    ) as answer:
        text = answer.read().decode()
    return sum(map(int, STARTED.findall(text))), sum(map(int, ENDED.findall(text)))


async def streams_started(etcd: Etcd) -> int:
    return (await asyncio.to_thread(etcd_counts, etcd))[0]


async def streams_open(etcd: Etcd) -> int:
    started, ended = await asyncio.to_thread(etcd_counts, etcd)
    return started - ended


async def all_closed(etcd: Etcd, what: str) -> None:
    async def none() -> bool:
        return await streams_open(etcd) == 0

    await until(none, CLOSED_WITHIN_S, f"no keepalive stream left open at etcd: {what}")


async def test_many_keepalives_use_one_stream(own_etcd: Etcd, store: Store) -> None:
    lease = await store.grant(TTL_S)
    before = await streams_started(own_etcd)
    for _ in range(20):
        assert await store.keepalive(lease) > 0
    assert await streams_started(own_etcd) - before == 1, "one stream for twenty keepalives"
    assert store.streams.keepalive_opened == 1
    await store.revoke(lease)
    await all_closed(own_etcd, "the lease revoked")


async def test_each_lease_has_a_stream_of_its_own(store: Store) -> None:
    first, second = await store.grant(TTL_S), await store.grant(TTL_S)
    for _ in range(3):
        assert await store.keepalive(first) > 0
        assert await store.keepalive(second) > 0
    assert store.streams.keepalive_opened == 2
    await store.revoke(first)
    assert await store.keepalive(second) > 0, "the other lease's stream goes on"
    assert store.streams.keepalive_opened == 2
    await store.revoke(second)


async def kept_alive_then_revoked_elsewhere(etcd: Etcd, store: Store) -> int:
    """A lease whose stream ``store`` has opened, revoked by another client."""
    lease = await store.grant(TTL_S)
    assert await store.keepalive(lease) > 0
    other = Store(etcd.url, timeout=2.0, tls=etcd.tls)
    try:
        await other.revoke(lease)
    finally:
        await other.close()
    return lease


async def test_a_lease_revoked_elsewhere_gets_0_on_its_open_stream(
    own_etcd: Etcd, store: Store
) -> None:
    lease = await kept_alive_then_revoked_elsewhere(own_etcd, store)
    assert await store.keepalive(lease) == 0, "etcd answers a lease it does not know with TTL 0"
    assert store.streams.keepalive_opened == 1, "the answer came on the open stream"
    await all_closed(own_etcd, "the lease gone")
    assert await store.keepalive(lease) == 0, "and again on a new one: still gone"


async def test_a_write_refused_for_a_lease_gone_ends_its_stream(
    own_etcd: Etcd, store: Store
) -> None:
    """Its holder takes a new lease and never sends the old one a keepalive again: the
    old lease's stream must not stay open for good."""
    lease = await kept_alive_then_revoked_elsewhere(own_etcd, store)
    assert await streams_open(own_etcd) == 1
    with pytest.raises(LeaseNotFound):
        await store.put(keys.PREFIX + "/keepalive/on-a-lease-gone", b"x", lease=lease)
    await all_closed(own_etcd, "a write on the lease refused")


async def test_a_lease_revoked_by_its_store_gets_0(store: Store) -> None:
    lease = await store.grant(TTL_S)
    assert await store.keepalive(lease) > 0
    await store.revoke(lease)
    assert await store.keepalive(lease) == 0


async def test_a_stream_broken_by_an_etcd_restart_is_opened_again(
    own_etcd: Etcd, store: Store
) -> None:
    """etcd keeps its leases across a restart: once it is back, the keepalives resume on
    a new stream, and stay on it."""
    lease = await store.grant(TTL_S)
    assert await store.keepalive(lease) > 0
    assert store.streams.keepalive_opened == 1
    own_etcd.stop()  # SIGTERM: etcd ends every stream and exits
    with pytest.raises(StoreError):
        await store.keepalive(lease)  # the stream is gone with etcd
    own_etcd.start()

    async def renewed() -> bool:
        try:
            return await store.keepalive(lease) > 0
        except StoreError:
            return False  # not reached yet: each failed keepalive drops its stream

    await until(renewed, BACK_WITHIN_S, "a keepalive confirmed by the restarted etcd")
    reopened = store.streams.keepalive_opened
    assert reopened >= 2
    for _ in range(5):
        assert await store.keepalive(lease) > 0
    assert store.streams.keepalive_opened == reopened, "the keepalives stay on the new stream"
    await store.revoke(lease)


async def test_an_answer_that_comes_late_is_never_taken_for_a_later_one(
    own_etcd: Etcd, store: Store
) -> None:
    """etcd's answers are held back by a relay past the store's deadline: that keepalive
    is a timeout (unconfirmed), and its answer, when it comes, is not read as the answer
    to the next keepalive. etcd stamps each answer with the revision it received the
    request at, and a write between the two keepalives tells them apart."""
    relay = EtcdRelay(own_etcd.url)  # TLS passed through: the agent's handshake is with etcd
    await relay.heal()
    slow = Store(relay.url, timeout=TIMEOUT_S, tls=own_etcd.tls)
    try:
        lease = await store.grant(TTL_S)
        assert await slow.keepalive(lease) > 0
        relay.slow(LATE_S)
        with pytest.raises(Timeout):
            await slow.keepalive(lease)
        written = await store.put(keys.PREFIX + "/keepalive/between", b"x")
        relay.slow(0.0)

        async def answered() -> Any:
            # Until the late answer has passed the relay, every answer is late as well
            # (the relay keeps the order): each of those keepalives times out too.
            try:
                return await slow.call(lambda: slow.client.refresh_lease(lease))
            except Timeout:
                return None

        reply = await until(answered, BACK_WITHIN_S, "a keepalive answered in time")
        assert reply.header.revision >= written, "the answer is to a request sent after the write"
        assert reply.TTL > 0
        assert slow.streams.keepalive_opened >= 2, "the late stream was dropped"
        await store.revoke(lease)
    finally:
        await slow.close()
        await relay.cut()


@pytest.mark.parametrize("killed", ["the member in use", "the leader"])
async def test_keepalives_resume_when_a_member_of_three_dies(
    test_pki: TestPki, killed: str
) -> None:
    """The member the store uses dies: the store moves on and opens a stream on the next.
    The leader dies: the members elect another, and the keepalives go on (on a new stream
    if their member ended the old one while it had no leader)."""
    members = EtcdCluster(pki=test_pki).start()
    store = Store(members.url, timeout=2.0, tls=members.tls)
    try:
        lease = await store.grant(TTL_S)
        assert await store.keepalive(lease) > 0
        in_use = [m.url for m in members.members].index(f"https://{store.member}")
        members.stop(in_use if killed == "the member in use" else members.leader())

        async def renewed() -> bool:
            try:
                return await store.keepalive(lease) > 0
            except StoreError:
                return False

        await until(renewed, BACK_WITHIN_S, f"a keepalive confirmed once {killed} died")
        opened = store.streams.keepalive_opened
        for _ in range(5):
            assert await store.keepalive(lease) > 0
        assert store.streams.keepalive_opened == opened, "the keepalives stay on one stream"
        if killed == "the member in use":
            assert opened >= 2
    finally:
        await store.close()
        members.cleanup()
