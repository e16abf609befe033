"""Waiting for the outcome of a switchover request, by watching etcd (no polling).

The active agent consumes a request and either hands over (an event ``switchover``
naming the request, then the leader key changes to the new node) or rejects it (an
event ``switchover_rejected`` naming the request, with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from hapair.shared import keys, records
from hapair.shared.store import Change, Store


@dataclass(frozen=True, slots=True)
class Before:
    """The leader when the request was written, and the revision it was read at."""

    node: str | None
    epoch: int | None
    revision: int


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    message: str


async def leader_before(store: Store, pair: str) -> Before:
    kvs, revision = await store.get_prefix(keys.leader(pair))
    for kv in kvs:
        if kv.key == keys.leader(pair):
            try:
                leader = records.decode(records.Leader, kv.value, kv.key)
            except records.RecordError:
                break
            return Before(leader.node, kv.create_revision, revision)
    return Before(None, None, revision)


def _judge(
    change: Change,
    pair: str,
    request: records.Switchover,
    before: Before,
    progress: Callable[[str], None],
) -> Outcome | None:
    kv = change.kv
    if kv.key == keys.leader(pair):
        if change.deleted:
            progress(f"{before.node or 'the active node'} stepped down")
            return None
        try:
            leader = records.decode(records.Leader, kv.value, kv.key)
        except records.RecordError:
            return None
        if kv.create_revision == before.epoch:
            return None
        was = f"was {before.node} epoch {before.epoch}" if before.node else "was none"
        if request.to is not None and leader.node != request.to:
            return Outcome(
                False,
                f"pair {pair}: {leader.node} is active now (epoch "
                f"{kv.create_revision}, {was}), not {request.to} as requested",
            )
        return Outcome(
            True, f"pair {pair}: {leader.node} is active now (epoch {kv.create_revision}, {was})"
        )
    if kv.key.startswith(keys.EVENTS_PREFIX) and not change.deleted:
        try:
            event = records.decode(records.Event, kv.value, kv.key)
        except records.RecordError:
            return None
        if event.details.get("request") != request.id:
            return None
        if event.kind == "switchover_rejected":
            by = event.node or "the active node"
            return Outcome(
                False,
                f"switchover of pair {pair} rejected by {by}: {event.reason or 'no reason given'}",
            )
        if event.kind == "switchover":
            progress(
                f"{event.node or before.node} is handing over to {event.details.get('to', '?')}"
            )
    return None


async def _still_pending(store: Store, pair: str, request: records.Switchover) -> bool:
    kv = await store.get(keys.switchover(pair))
    if kv is None:
        return False
    try:
        return records.decode(records.Switchover, kv.value, kv.key).id == request.id
    except records.RecordError:
        return False


async def await_switchover(
    store: Store,
    pair: str,
    request: records.Switchover,
    before: Before,
    wait_s: float,
    progress: Callable[[str], None],
) -> Outcome:
    started = time.monotonic()
    changes = store.watch_prefix(keys.PREFIX + "/", before.revision + 1)
    try:
        async with asyncio.timeout(wait_s):
            async for change in changes:
                outcome = _judge(change, pair, request, before, progress)
                if outcome is not None:
                    if not outcome.ok:
                        return outcome
                    took = time.monotonic() - started
                    return Outcome(True, f"{outcome.message} after {took:.2f} s")
    except TimeoutError:
        pass
    finally:
        if isinstance(changes, AsyncGenerator):
            with contextlib.suppress(Exception):
                await changes.aclose()
    if await _still_pending(store, pair, request):
        hint = f"the request is still pending: is the active agent of pair {pair} running?"
    else:
        hint = "the active agent took the request but the pair has not changed yet"
    return Outcome(False, f"no outcome for switchover of pair {pair} after {wait_s:g} s: {hint}")
