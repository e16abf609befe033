"""``hapair switchover``, ``pause``, ``resume``, ``ack``, ``takeover``, ``drain`` and
``undrain``: an operator's requests on a pair's failover, written to etcd through
``shared/admin.py``; the agents carry them out. A command that moves a pair waits for
the outcome it asked for (``--wait``) and says it, or why it did not come.
"""

from __future__ import annotations

import argparse
import asyncio

from hapair.registry.console.command import (
    OK,
    REFUSED,
    Failed,
    connected,
    operator,
    say,
    when,
)
from hapair.registry.console.confirm import confirmed
from hapair.registry.console.outcome import Before, await_switchover, leader_before
from hapair.shared import admin, keys, records
from hapair.shared.store import Store


async def _follow(
    store: Store, pair: str, request: records.Switchover, before: Before, wait_s: float
) -> int:
    if wait_s <= 0:
        return OK
    say(f"waiting up to {wait_s:g} s for the outcome...")
    outcome = await await_switchover(
        store, pair, request, before, wait_s, lambda line: say(f"  {line}")
    )
    if not outcome.ok:
        raise Failed(REFUSED, outcome.message)
    say(outcome.message)
    return OK


async def switchover(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        before = await leader_before(store, args.pair)
        request = await admin.request_switchover(
            store, args.pair, args.to, operator(store), args.reason
        )
        target = args.to or "the first ready standby"
        say(
            f"switchover of pair {args.pair} requested (request {request.id}): "
            f"{before.node} -> {target}"
        )
        return await _follow(store, args.pair, request, before, args.wait)


async def pause(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        await admin.pause(store, args.pair, operator(store), args.reason)
    say(
        f"pair {args.pair} paused: no automatic failover until `hapair resume {args.pair}`; "
        "its services keep running"
    )
    return OK


async def ack(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        done = await admin.ack(store, args.pair, args.epoch, operator(store))
    say(
        f"recovery of pair {args.pair} at epoch {done.epoch} acknowledged: "
        f"{', '.join(done.held) or 'no service'} starting on {done.to_node} "
        f"(cause: {done.cause})"
    )
    return OK


async def takeover(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        risk = await admin.takeover_risk(store, args.pair, args.node)
        warning = risk.warning()
        if warning is not None:
            say(f"WARNING: {warning}")
        if not args.yes:
            await confirmed(
                args.pair,
                f"force {args.node} to take it over",
                "force the takeover",
                "takeover cancelled",
            )
        request = await admin.force_takeover(
            store, args.pair, args.node, operator(store), args.reason
        )
        say(
            f"takeover of pair {args.pair} by {args.node} forced (request {request.id}); "
            f"it lapses unused after {admin.TAKEOVER_VALID_S} s"
        )
        if args.wait <= 0:
            return OK

        async def taken() -> bool:
            kv = await store.get(keys.leader(args.pair))
            leader = records.decode(records.Leader, kv.value, kv.key) if kv else None
            return leader is not None and leader.node == args.node

        deadline = asyncio.get_running_loop().time() + args.wait
        while not await taken():
            if asyncio.get_running_loop().time() > deadline:
                raise Failed(
                    REFUSED,
                    f"{args.node} did not take pair {args.pair} over within {args.wait:g} s; "
                    "see hapair status",
                )
            await asyncio.sleep(0.1)
        say(f"{args.node} is active in pair {args.pair}")
        return OK


async def resume(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        was = await admin.resume(store, args.pair, operator(store))
    say(
        f"pair {args.pair} resumed: automatic failover is on again "
        f"(it was paused by {was.by} at {when(was.at)})"
    )
    return OK


async def drain(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        # Any read gives the revision to watch from: the outcome may come within
        # milliseconds of the request, before a read after it.
        _, revision = await store.get_prefix(keys.drained(args.node))
        result = await admin.drain(store, args.node, operator(store), args.reason)
        say(f"node {args.node} drained: it will not become active")
        if result.switchover is None or result.pair is None:
            return OK
        say(
            f"{args.node} is active in pair {result.pair}: switchover requested "
            f"(request {result.switchover.id})"
        )
        before = Before(args.node, result.epoch, revision)
        return await _follow(store, result.pair, result.switchover, before, args.wait)


async def undrain(args: argparse.Namespace) -> int:
    async with connected(args) as store:
        was = await admin.undrain(store, args.node, operator(store))
    say(
        f"node {args.node} undrained: eligible again (it was drained by {was.by} at {when(was.at)})"
    )
    return OK
