"""The peer path is authenticated: an attacker on the plant network, who can capture
and send any datagram with any source address but does not have the pair's key, can
neither block a failover, nor free a standby from its promise, nor keep an active that
lost etcd running past its fence point.

Real agents with a peer key file each; the attacker is this test, root on the loopback:
raw sockets to spoof the source, a capture of the loopback to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hapair.shared import keys
from hapair.shared.pki import peer_key
from hapair.shared.records import Switchover
from tests.integration.test_etcd_loss import (
    LOST_S,
    a_behind_a_relay,
    only,
    service_pids,
    with_peer_path,
)
from tests.integration.test_failover import pair
from tests.support.cluster import Cluster, holds, pid_alive, until
from tests.support.etcd_relay import EtcdRelay
from tests.support.harness import free_port
from tests.support.spoof import Sniffer, send_as

pytestmark = pytest.mark.e2e


def forged(body: dict[str, Any]) -> list[bytes]:
    """``body`` as the attacker can send it without the key: bare, as the peer path
    spoke before it was authenticated, and sealed with a key of its own."""
    bare = json.dumps({"v": 1, **body}, separators=(",", ":")).encode()
    fields = {"v": 2, **body, "run": FORGER_RUN, "born": time.time_ns(), "n": 1}
    data = json.dumps(fields, separators=(",", ":")).encode()
    return [bare, hmac.new(os.urandom(32), data, hashlib.sha256).hexdigest().encode() + data]


FORGER_RUN = "f" * 16
DROPPED = "peer path: datagrams dropped"


async def logged(cluster: Cluster, node: str, line: str) -> bool:
    return line in cluster.log(node)


def body_of(payload: bytes) -> dict[str, Any] | None:
    """The JSON body of a captured datagram, whatever authenticates it."""
    with contextlib.suppress(ValueError):
        start = payload.index(b"{")
        body = json.loads(payload[start:])
        return body if isinstance(body, dict) else None
    return None


@contextlib.asynccontextmanager
async def sending(
    payloads: Callable[[], list[bytes]], source: tuple[str, int], to: tuple[str, int]
) -> AsyncIterator[list[int]]:
    """Send ``payloads()`` as ``source`` every 50 ms until the block ends; yields the
    number of rounds sent so far."""
    rounds = [0]

    async def run() -> None:
        while True:
            for p in payloads():
                send_as(source, to, p)
            rounds[0] += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(run())
    try:
        yield rounds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def addresses(net: int, spec: dict[str, Any]) -> tuple[tuple[str, int], tuple[str, int]]:
    port = spec["network"]["peer_port"]
    return (f"127.0.{net}.1", port), (f"127.0.{net}.2", port)


async def test_a_forged_hold_does_not_block_a_failover(cluster: Cluster, tmp_path: Path) -> None:
    """Holds with a huge epoch and TTL, sent as a's agent from a's own address and port,
    before and after a crashes: b takes over once a's lease expired, as without them."""
    key = peer_key(tmp_path / "keys", "p")
    _, spec, epoch = await a_behind_a_relay(cluster, ["a", "b"], 131, key=key)
    a, b = addresses(131, spec)
    hold = {"from": "a", "seq": 7, "t": "hold", "epoch": 2**40, "ttl": 3600}
    async with sending(lambda: forged(hold), a, b) as rounds:
        await until(lambda: _true(rounds[0] >= 20), 10, "forged holds sent to b")
        await until(lambda: logged(cluster, "b", DROPPED), 10, "b dropped the forged holds")
        crashed_at = time.monotonic()
        for pid in cluster.crash("a"):
            assert not pid_alive(pid)
        # The failover's own bound: the lease (TTL 2 s) expires, b campaigns.
        node, _ = await cluster.active("p", not_epoch=epoch, timeout=10)
        assert node == "b", node
        took = time.monotonic() - crashed_at
    assert took < 8.0, took


@pytest.mark.long
async def test_a_replayed_or_forged_release_does_not_free_a_promise(
    cluster: Cluster, tmp_path: Path
) -> None:
    """a, cut from etcd for less than its lease, asked b to hold; handing the pair over
    to b later, it released b. That release, captured, and one forged for a's next term,
    sent as a while a is cut off again and holds the pair on b's promise, leave b bound:
    a stays alone. A long lease gives the test time to act within one."""
    ttl = 8.0
    key = peer_key(tmp_path / "keys", "p")
    relay = EtcdRelay(cluster.etcd.url)
    await relay.heal()
    spec = with_peer_path(pair("p", ["a", "b"], 132, free_port(), cluster.record), 132, key)
    spec["failover"] = {"lease_ttl_s": ttl}
    await cluster.apply(cluster.site([spec]))
    cluster.start("a", "--etcd", relay.url)
    _, epoch = await cluster.active("p", node="a", timeout=20)
    cluster.start("b")
    await cluster.standby("b", timeout=20)
    a, b = addresses(132, spec)

    async def b_holds(leader_gone: bool) -> bool:
        st = await cluster.status("b")
        gone = await cluster.leader("p") is None
        return st is not None and st.held_by == "a" and (gone or not leader_gone)

    with Sniffer(b[1]) as capture:
        # Episode 1: b promises; a reaches etcd again, then hands the pair over to b.
        await relay.cut()
        await until(lambda: b_holds(leader_gone=False), ttl, "b promised a to hold")
        await relay.heal()
        again = "etcd confirms the lease again"
        await until(lambda: logged(cluster, "a", again), ttl, "a's lease confirmed again")
        await cluster.store.put(keys.switchover("p"), Switchover(to="b").encode())
        _, epoch = await cluster.active("p", node="b", not_epoch=epoch, timeout=20)

        def releases() -> list[bytes]:
            return [
                d.payload
                for d in capture.seen
                if d.source == a and (body_of(d.payload) or {}).get("t") == "release"
            ]

        await until(lambda: _true(releases()), 10, "a's release captured")
        await cluster.store.put(keys.switchover("p"), Switchover(to="a").encode())
        _, epoch = await cluster.active("p", node="a", not_epoch=epoch, timeout=20)
    # Episode 2: a cut off again, its key expired, b bound by its promise.
    pids = service_pids(cluster, "a")
    await relay.cut()
    await until(lambda: b_holds(leader_gone=True), 3 * ttl, "a's key expired, b holds")
    release = {"from": "a", "seq": 9, "t": "release", "epoch": epoch}
    async with sending(lambda: releases() + forged(release), a, b) as rounds:
        await until(lambda: _true(rounds[0] >= 10), 10, "releases sent to b")
        await until(lambda: logged(cluster, "b", "replayed"), 15, "b dropped the replays")
        await holds(only(cluster, "a", pids), LOST_S, "b was freed from its promise to a")
    await relay.heal()
    await cluster.active("p", not_epoch=epoch, timeout=30)
    await relay.cut()


async def test_a_forged_hold_reply_does_not_keep_an_active_cut_from_etcd(
    cluster: Cluster, tmp_path: Path
) -> None:
    """b's agent is down; the attacker answers a's holds as b, from b's address and
    port, echoing each hold's number and term: a still fences at its lease's fence point."""
    key = peer_key(tmp_path / "keys", "p")
    relay, spec, _ = await a_behind_a_relay(cluster, ["a", "b"], 133, key=key)
    a, b = addresses(133, spec)
    pids = service_pids(cluster, "a")
    await cluster.crashed("b")
    answered = [0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as as_b:
        as_b.bind(b)  # b's agent is gone: its port is free
        as_b.setblocking(False)
        loop = asyncio.get_running_loop()

        async def answer() -> None:
            while True:
                data = await loop.sock_recv(as_b, 2048)
                hold = body_of(data)
                if hold is None or hold.get("t") != "hold":
                    continue
                reply = {
                    "from": "b",
                    "to": "a",
                    "seq": hold["seq"],
                    "t": "held",
                    "epoch": hold["epoch"],
                    "promised": True,
                    "reason": "",
                }
                for p in forged(reply):
                    as_b.sendto(p, a)
                answered[0] += 1

        task = asyncio.create_task(answer())
        try:
            await relay.cut()

            async def fenced() -> bool:
                return not service_pids(cluster, "a") and not any(pid_alive(p) for p in pids)

            # The lease's own fence point (1.5 s after the last confirmed keepalive).
            await until(fenced, 6, "a fenced though a forged b promised to hold")
            assert answered[0] > 0, "a never asked b to hold"
            assert DROPPED in cluster.log("a")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await relay.heal()
    await cluster.active("p", timeout=30)


async def _true(value: object) -> bool:
    return bool(value)
