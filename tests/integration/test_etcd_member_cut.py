"""One etcd member of three goes bad while the other two keep the quorum.

The member stays reachable by clients: cut from its two peers at the switch (it answers
TCP and gRPC but can serve nothing that needs the quorum), or frozen with SIGSTOP (the
kernel still accepts connections for it). Agents and registries attached to it must
carry on through the other members, and a registry that cannot must say it is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from hapair.shared import pki
from hapair.shared.store import Store, StoreError
from tests.integration.test_etcd_loss import only, started
from tests.support import netns
from tests.support.client_lab import REGISTRY
from tests.support.cluster import Cluster, holds, until
from tests.support.etcd_lab import EtcdLab, connected_members
from tests.support.harness import Etcd, free_port
from tests.support.site_records import FakeAgent, apply_site

pytestmark = pytest.mark.e2e

BAD_S = 8.0  # the member stays bad for four lease TTLs: far past every fence point
STALE_WITHIN_S = 15.0  # generous: the registry's freshness bound is a few seconds


@pytest.fixture
def etcd_lab(tmp_path: Path) -> Iterator[EtcdLab]:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with EtcdLab(tmp_path) as lab:
        yield lab


async def attached(etcd: EtcdLab, pid: int) -> str:
    """The one member ``pid`` talks to now."""

    async def one() -> str | None:
        found = connected_members(etcd, pid)
        return next(iter(found)) if len(found) == 1 else None

    return str(await until(one, 10, f"process {pid} attached to one etcd member"))


def others(etcd: EtcdLab, name: str) -> str:
    """Every member but ``name``, as a client URL list."""
    return ",".join(etcd.client_url(n) for n in etcd.names if n != name)


def bad_member(etcd: EtcdLab, fault: str) -> tuple[Callable[[str], None], Callable[[str], None]]:
    if fault == "cut":
        return etcd.cut_from_peers, etcd.heal
    return etcd.freeze, etcd.thaw


# ---- the agent ------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "frozen"])
async def test_active_keeps_its_lease_through_the_other_members(
    etcd_lab: EtcdLab, tmp_path: Path, fault: str
) -> None:
    """No peer path: the lease is the active's only way to keep its services, so a fence
    here would mean the agent stayed on the bad member."""
    c = Cluster(etcd_lab, tmp_path)
    try:
        pids = await started(c, ["a", "b"], 47, peer_path=False)
        lead = await c.leader("p")
        member = await attached(etcd_lab, c.agents["a"].pid)
        await asyncio.to_thread(etcd_lab.make_follower, member)
        # The test's own view, through the other members.
        c.store = Store(others(etcd_lab, member), timeout=2.0, tls=etcd_lab.tls)
        go_bad, heal = bad_member(etcd_lab, fault)
        go_bad(member)
        try:
            await holds(only(c, "a", pids), BAD_S, f"a lost its services with {member} {fault}")
            assert await c.leader("p") == lead, "the pair moved"
            assert "lease lost" not in c.log("a")
        finally:
            heal(member)
    finally:
        await c.stop_all()
    c.assert_no_overlap()


# ---- the registry ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def registry(etcd: EtcdLab, etcd_url: str) -> AsyncIterator[tuple[ClientSession, int]]:
    """``hapair-registry`` as its own process (so its etcd connections are its own), on
    ``etcd_url`` with the registry's certificate of ``etcd``'s PKI."""
    port = free_port()
    env = {**os.environ, **etcd.client_env(REGISTRY, pki.Kind.REGISTRY)}
    env.update(HAPAIR_ETCD=etcd_url, HAPAIR_LISTEN=f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "hapair-registry"), env=env
    )
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def look(session: ClientSession, path: str) -> tuple[int, dict[str, Any], str | None]:
    with contextlib.suppress(OSError):
        async with session.get(path) as resp:
            return resp.status, await resp.json(), resp.headers.get("X-Hapair-Stale")
    return 0, {}, None


async def serving(session: ClientSession, epoch: int) -> bool:
    """The registry answers ``epoch`` for mes-api, fresh, and says it is healthy."""
    status, body, stale = await look(session, "/v1/endpoints/mes-api")
    health, _, _ = await look(session, "/healthz")
    return status == 200 and body.get("epoch") == epoch and stale is None and health == 200


@pytest.mark.parametrize("fault", ["cut", "frozen"])
async def test_registry_serves_the_new_epoch_through_the_other_members(
    etcd_lab: EtcdLab, fault: str
) -> None:
    async with registry(etcd_lab, etcd_lab.url) as (session, pid):
        member = await attached(etcd_lab, pid)
        await asyncio.to_thread(etcd_lab.make_follower, member)
        store = Store(others(etcd_lab, member), timeout=2.0, tls=etcd_lab.tls)
        try:
            await apply_site(store)
            a = await FakeAgent(store, "asm-a", "asm").up()
            b = await FakeAgent(store, "asm-b", "asm").up()
            old = await a.become_active()
            await a.publish("mes-api", 8080)
            await until(lambda: serving(session, old), 20, "the registry to serve epoch 1")
            go_bad, heal = bad_member(etcd_lab, fault)
            go_bad(member)
            try:
                await a.crash()
                new = await b.become_active()
                await b.publish("mes-api", 8080)
                await until(
                    lambda: serving(session, new),
                    STALE_WITHIN_S,
                    f"the registry to serve the new epoch with {member} {fault}",
                )
            finally:
                heal(member)
        finally:
            await store.close()


@pytest.mark.parametrize("fault", ["cut", "frozen"])
async def test_registry_on_one_bad_member_says_it_is_stale(etcd_lab: EtcdLab, fault: str) -> None:
    """Given only the bad member, the registry cannot get news: it must say so."""
    member = etcd_lab.names[0]
    await asyncio.to_thread(etcd_lab.make_follower, member)
    store = Store(others(etcd_lab, member), timeout=2.0, tls=etcd_lab.tls)
    try:
        await apply_site(store)
        a = await FakeAgent(store, "asm-a", "asm").up()
        epoch = await a.become_active()
        await a.publish("mes-api", 8080)
        async with registry(etcd_lab, etcd_lab.client_url(member)) as (session, _):
            await until(lambda: serving(session, epoch), 20, "the registry to serve")
            go_bad, heal = bad_member(etcd_lab, fault)
            go_bad(member)
            try:

                async def stale() -> bool:
                    """The last answer it has, marked stale; unhealthy, saying why."""
                    status, body, why = await look(session, "/v1/endpoints/mes-api")
                    health, hbody, _ = await look(session, "/healthz")
                    last = status == 200 and body.get("epoch") == epoch
                    return last and why is not None and health == 503 and "error" in hbody

                await until(stale, STALE_WITHIN_S, f"the registry to say it is stale ({fault})")
            finally:
                heal(member)
            await until(lambda: serving(session, epoch), 30, "the registry fresh again")
    finally:
        await store.close()


# ---- require-leader ---------------------------------------------------------------------


async def test_a_member_cut_from_its_quorum_says_so_to_keepalives_and_watches(
    etcd_lab: EtcdLab,
) -> None:
    """Without require-leader the member leaves both waiting: a keepalive until its
    deadline, a watch forever. With it, both end with etcd's "no leader" error."""
    member = etcd_lab.names[0]
    await asyncio.to_thread(etcd_lab.make_follower, member)
    alone = Store(etcd_lab.client_url(member), timeout=1.0, tls=etcd_lab.tls)
    try:
        lease = await alone.grant(30)
        assert await alone.keepalive(lease) > 0

        async def watch() -> str:
            try:
                async for _ in alone.watch_prefix("/hapair/v1/", 1):
                    pass
            except StoreError as err:
                return str(err)
            return "ended without an error"

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0)
        etcd_lab.cut_from_peers(member)

        async def refused() -> str | None:
            try:
                await alone.keepalive(lease)
            except StoreError as err:
                return str(err) if "no leader" in str(err) else None
            return None

        await until(refused, STALE_WITHIN_S, "a keepalive refused with 'no leader'")
        async with asyncio.timeout(STALE_WITHIN_S):
            assert "no leader" in await watching
    finally:
        etcd_lab.heal(member)
        await alone.close()


# ---- pre-vote -----------------------------------------------------------------------------
CUT_S = 5.0  # several election timeouts (etcd's default: 1 s, randomized up to 2 s)


def raft(etcd: EtcdLab, name: str) -> tuple[int, int]:
    """``name``'s raft term and the leader it follows, as it says itself."""
    out = etcd._ctl(f"--endpoints={etcd.client_url(name)}", "endpoint", "status", "-w", "json")
    status = json.loads(out.stdout)[0]["Status"]
    return int(status["raftTerm"]), int(status["leader"])


async def test_a_member_cut_off_and_back_does_not_unseat_the_leader(etcd_lab: EtcdLab) -> None:
    """With pre-vote, a follower cut from its peers asks whether it could win before it
    raises its term, and cannot: it comes back at the term it left, under the same
    leader. Without, it comes back with a higher term and forces an election on the
    healthy two, stalling every client's keepalives meanwhile."""
    member = etcd_lab.names[0]
    await asyncio.to_thread(etcd_lab.make_follower, member)
    term, leader = await asyncio.to_thread(raft, etcd_lab, member)
    etcd_lab.cut_from_peers(member)
    try:
        await asyncio.sleep(CUT_S)  # the fault's length
    finally:
        etcd_lab.heal(member)

    async def rejoined() -> bool:
        return member in await asyncio.to_thread(etcd_lab.healthy)

    await until(rejoined, 20, f"{member} serving again")
    for name in etcd_lab.names:
        assert await asyncio.to_thread(raft, etcd_lab, name) == (term, leader), (
            f"{name} is no longer at raft term {term} under the same leader"
        )


# ---- keepalive ----------------------------------------------------------------------------


async def test_a_watch_on_a_frozen_member_ends(etcd: Etcd) -> None:
    """Nothing changes under the prefix, so only HTTP/2 pings can find that the member
    stopped answering; without them the watch waits forever."""
    alone = Store(etcd.url, timeout=1.0, tls=etcd.tls)
    try:
        assert etcd.proc is not None
        opened = asyncio.Event()

        async def watch() -> str:
            try:
                async for _ in alone.watch_prefix("/hapair/v1/quiet/", 1, opened.set):
                    pass
            except StoreError as err:
                return str(err)
            return "ended without an error"

        watching = asyncio.create_task(watch())
        async with asyncio.timeout(10):
            await opened.wait()
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(STALE_WITHIN_S):
                assert "ping timeout" in await watching
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
    finally:
        await alone.close()


async def test_a_watch_confirmed_late_is_not_taken_for_the_next_one(etcd: Etcd) -> None:
    """etcd confirms a watch after the client gave up waiting for it (the member was
    frozen for a moment); the next watch asked for on the same connection must still
    follow its own keys, not the abandoned watch's."""
    alone = Store(etcd.url, timeout=1.0, tls=etcd.tls)
    assert etcd.proc is not None
    seen: list[str] = []
    try:
        await alone.get("/hapair/v1/x")  # the connection is up
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreError):
                async for _ in alone.watch_prefix("/hapair/v1/a/", 1):
                    pass
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        opened = asyncio.Event()

        async def follow_b() -> None:
            async for change in alone.watch_prefix("/hapair/v1/b/", 0, opened.set):
                seen.append(change.kv.key)

        watching = asyncio.create_task(follow_b())
        try:
            async with asyncio.timeout(10):
                await opened.wait()
            await alone.put("/hapair/v1/a/1", b"")
            await alone.put("/hapair/v1/b/1", b"")
            await until(lambda: _truthy(seen), 10, "the watch of b/ to see b/1")
            assert seen == ["/hapair/v1/b/1"]
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await watching
    finally:
        await alone.close()


async def _truthy(items: list[str]) -> bool:
    return bool(items)
