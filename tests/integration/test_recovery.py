"""Assisted recovery, end to end: held process functions wait for an operator's ack."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.records import HeldContext, Leader, Recovery, Switchover, decode
from hapair.shared.store import Store
from hapair.workshop_agent import recovery as rec_mod
from tests.support.cluster import Cluster, holds, recording_service, until
from tests.support.harness import free_port

pytestmark = pytest.mark.e2e
HAPAIR = str(Path(sys.executable).parent / "hapair")


async def start_pair(c: Cluster, net: int, **held: Any) -> int:
    services = [
        recording_service("p-svc", free_port(), c.record),
        recording_service("p-proc", free_port(), c.record, hold_until_ack=True, **held),
    ]
    nodes = [{"name": n, "address": f"127.0.{net}.{i + 1}"} for i, n in enumerate("ab")]
    await c.apply(c.site([{"name": "p", "nodes": nodes, "services": services}]))
    c.start("a")
    _, epoch = await c.active("p", node="a")
    c.start("b")
    await c.standby("b")
    return epoch


def runs(c: Cluster, node: str, service: str) -> int:
    return sum(1 for r in c.intervals() if r["node"] == node and r["service"] == service)


async def recovery(c: Cluster) -> Recovery | None:
    kv = await c.store.get(keys.recovery("p"))
    return None if kv is None else decode(Recovery, kv.value, kv.key)


async def hapair(c: Cluster, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        HAPAIR,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **c.etcd.operator_env("tester"), "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode()


async def service_state(c: Cluster, node: str, name: str) -> str | None:
    st = await c.status(node)
    svc = next((s for s in st.services if s.name == name), None) if st else None
    return svc.state if svc else None


async def test_first_election_holds_nothing(cluster: Cluster) -> None:
    await start_pair(cluster, 40)
    await until(lambda: _state_is(cluster, "a", "p-proc", "running"), 10, "p-proc running")
    assert await recovery(cluster) is None


async def _state_is(c: Cluster, node: str, name: str, state: str) -> bool:
    return await service_state(c, node, name) == state


async def test_unplanned_failover_holds_until_the_operator_acknowledges(
    cluster: Cluster,
) -> None:
    epoch = await start_pair(cluster, 41)
    await until(lambda: _state_is(cluster, "a", "p-proc", "running"), 10, "p-proc on a")
    cluster.crash("a")
    _, new_epoch = await cluster.active("p", not_epoch=epoch, node="b")
    rec = await until(lambda: recovery(cluster), 5, "the recovery record")
    assert (rec.epoch, rec.state, rec.held, rec.to_node) == (new_epoch, "awaiting", ["p-proc"], "b")
    assert rec.cause == "failover from a"
    await until(lambda: _state_is(cluster, "b", "p-svc", "running"), 10, "p-svc on b")

    async def still_held() -> bool:
        return await service_state(cluster, "b", "p-proc") == "held"

    await holds(still_held, 1.0, "the held service started without an ack")
    assert runs(cluster, "b", "p-proc") == 0
    st = await cluster.status("b")
    assert st is not None and "awaiting operator: p-proc" in st.problems

    code, out = await hapair(cluster, "status")
    assert code == 0 and "AWAITING OPERATOR: p" in out and "held: p-proc" in out, out

    code, out = await hapair(cluster, "ack", "p", "--epoch", str(epoch))
    assert code == 1 and f"not {epoch}: refused" in out
    assert await service_state(cluster, "b", "p-proc") == "held"

    code, out = await hapair(cluster, "ack", "p", "--epoch", str(new_epoch))
    assert code == 0, out
    assert "acknowledged" in out
    await until(lambda: _state_is(cluster, "b", "p-proc", "running"), 10, "p-proc after ack")
    rec = await recovery(cluster)
    assert rec is not None and rec.state == "acknowledged" and rec.acked_by == "tester"

    code, out = await hapair(cluster, "ack", "p")
    assert code == 1 and "already acknowledged" in out and "nothing changed" in out
    assert len([e for e in await cluster.events("ack") if e["pair"] == "p"]) == 1
    # A pair without a database has no process context to show.
    rec = await recovery(cluster)
    assert rec is not None and rec.contexts is None


async def test_planned_switchover_does_not_hold(cluster: Cluster) -> None:
    epoch = await start_pair(cluster, 42)
    await cluster.store.put(keys.switchover("p"), Switchover(to="b").encode())
    await cluster.active("p", not_epoch=epoch, node="b")
    await until(lambda: _state_is(cluster, "b", "p-proc", "running"), 10, "p-proc on b")
    assert await recovery(cluster) is None


async def test_auto_ack_starts_the_held_service_by_itself(cluster: Cluster) -> None:
    epoch = await start_pair(cluster, 43, auto_ack_after_s=1.0)
    await until(lambda: _state_is(cluster, "a", "p-proc", "running"), 10, "p-proc on a")
    cluster.crash("a")
    await cluster.active("p", not_epoch=epoch, node="b")
    assert await service_state(cluster, "b", "p-proc") == "held"
    await until(lambda: _state_is(cluster, "b", "p-proc", "running"), 10, "auto release")

    async def auto_acked() -> bool:
        rec = await recovery(cluster)
        return rec is not None and rec.state == "acknowledged" and rec.acked_by == "auto"

    await until(auto_acked, 5, "the recovery marked acknowledged by auto")


# ---- where a held service resumes: naming, and publishing it with the recovery ----------


async def test_contexts_are_added_to_the_recovery_of_the_current_term_only(store: Store) -> None:
    leader = await store.put(keys.leader("p"), Leader(node="b").encode())
    rec = Recovery(
        epoch=leader, cause="failover from a", from_node="a", to_node="b", held=["batch"]
    )
    await store.put(keys.recovery("p"), rec.encode())
    contexts = {"batch": HeldContext(process="batch", database="mes", step=4, last_step=3, epoch=7)}

    assert await rec_mod.publish_contexts(store, "p", leader, contexts)
    got = await _recovery(store)
    assert got == rec.model_copy(update={"contexts": contexts})

    # An ack written first is kept: the contexts are added to it, not over it.
    await store.put(
        keys.recovery("p"),
        rec.model_copy(update={"state": "acknowledged", "acked_by": "op"}).encode(),
    )
    assert await rec_mod.publish_contexts(store, "p", leader, contexts)
    got = await _recovery(store)
    assert (got.state, got.acked_by, got.contexts) == ("acknowledged", "op", contexts)

    # Not for an older term: neither the record of another epoch nor after the key moved.
    assert not await rec_mod.publish_contexts(store, "p", leader - 1, contexts)
    await store.put(keys.recovery("p"), rec.encode())
    await store.delete(keys.leader("p"))
    newer = await store.put(keys.leader("p"), Leader(node="a").encode())
    assert newer > leader
    assert not await rec_mod.publish_contexts(store, "p", leader, contexts)
    assert (await _recovery(store)).contexts is None
    await store.delete(keys.recovery("p"))
    assert not await rec_mod.publish_contexts(store, "p", newer, contexts)


async def _recovery(store: Store) -> Recovery:
    kv = await store.get(keys.recovery("p"))
    assert kv is not None
    return decode(Recovery, kv.value, kv.key)
