"""Network probes between whole nodes in network namespaces, with cut links and partitions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.support import netns
from tests.unit.test_probes import FAST, LISTEN, NODE, eventually

NETNS_UNAVAILABLE = netns.unavailable()
needs_netns = pytest.mark.skipif(
    NETNS_UNAVAILABLE is not None,
    reason=f"network namespaces unavailable: {NETNS_UNAVAILABLE}",
)


class Node:
    """A node's probes running in a host; ``last`` is its latest summary."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.last: dict[str, Any] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.last = json.loads(line)

    async def until(
        self, cond: Callable[[dict[str, Any]], bool], what: str, timeout: float = 3.0
    ) -> float:
        return await eventually(lambda: bool(self.last) and cond(self.last), timeout, what)

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def run_nodes(
    lab: netns.Lab, specs: dict[str, dict[str, Any]]
) -> AsyncIterator[dict[str, Node]]:
    running: dict[str, Node] = {}
    try:
        for name, cfg in specs.items():
            argv = lab[name].argv(sys.executable, "-c", NODE, json.dumps(cfg))
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            running[name] = Node(proc)
        yield running
    finally:
        for node in running.values():
            await node.stop()


@contextlib.contextmanager
def lab_of(*hosts: str) -> Iterator[netns.Lab]:
    with netns.Lab(hosts) as lab:
        yield lab


@needs_netns
async def test_icmp_blackholed_address_is_lost() -> None:
    with lab_of("a", "gw") as lab:
        a, gw = lab["a"], lab["gw"]
        a.ip("route", "add", "blackhole", "10.200.0.1/32")
        net = {"probe_targets": ["10.200.0.1", gw.address], **FAST, "peer_port": 7400}
        spec = {"me": "a", "address": a.address, "peers": {}, "network": net}
        async with run_nodes(lab, {"a": spec}) as nodes_:
            node = nodes_["a"]
            await node.until(lambda s: s["lost"] == ["10.200.0.1"], "blackholed target lost")
            await node.until(lambda s: s["reached"] == [gw.address], "gateway reached")
            assert "probe target 10.200.0.1 lost" in node.last["alarms"]
            assert node.last["details"]["10.200.0.1"] == "Invalid argument"  # blackhole route
            assert node.last["network_ok"]


def _pair_specs(lab: netns.Lab) -> dict[str, dict[str, Any]]:
    gw = lab["gw"]
    targets = [gw.address, f"{gw.address}:8502"]
    net = {"probe_targets": targets, **FAST, "peer_port": 7400}
    return {
        me: {
            "me": me,
            "address": lab[me].address,
            "peers": {other: lab[other].address},
            "network": net,
        }
        for me, other in (("a", "b"), ("b", "a"))
    }


async def _healthy(nodes_: dict[str, Node], gw: str) -> None:
    """Each node sees the other and reaches both targets, with no alarm."""
    for me, other in (("a", "b"), ("b", "a")):

        def healthy(s: dict[str, Any], other: str = other) -> bool:
            reached = s["reached"] == [gw, f"{gw}:8502"]
            return bool(s["visible"] == [other] and reached and s["network_ok"] and not s["alarms"])

        await nodes_[me].until(healthy, f"{me} healthy")


@needs_netns
async def test_cut_link_isolates_only_that_node() -> None:
    with lab_of("a", "b", "gw") as lab:
        a, gw = lab["a"], lab["gw"]
        lab.spawn(gw, sys.executable, "-c", LISTEN, "8502")
        async with run_nodes(lab, _pair_specs(lab)) as n:
            await _healthy(n, gw.address)
            lab.cut(a)
            cut_at = time.monotonic()
            await n["a"].until(lambda s: s["visible"] == [] and len(s["lost"]) == 2, "a loses all")
            await n["b"].until(lambda s: s["visible"] == [], "b loses a")
            await n["a"].until(lambda s: not s["network_ok"], "a isolated")
            took = time.monotonic() - cut_at
            # isolation_after_s after the last answer, which came at most a round before the cut.
            assert 0.6 - 0.15 < took < 0.6 + 1.5, took
            assert n["a"].last["alarms"][-1].startswith("network isolated")
            # Meanwhile b still reaches the gateway: it is the one to take over.
            assert n["b"].last["network_ok"] and n["b"].last["lost"] == []
            assert "peer a not visible" in n["b"].last["alarms"][0]
            lab.restore(a)
            await _healthy(n, gw.address)


@needs_netns
async def test_partition_between_nodes_is_no_isolation() -> None:
    with lab_of("a", "b", "gw") as lab:
        a, b, gw = lab["a"], lab["b"], lab["gw"]
        lab.spawn(gw, sys.executable, "-c", LISTEN, "8502")
        async with run_nodes(lab, _pair_specs(lab)) as n:
            await _healthy(n, gw.address)
            lab.partition(a, b)
            for me in ("a", "b"):
                await n[me].until(lambda s: s["visible"] == [], f"{me} loses its peer")
            await asyncio.sleep(0.7)  # past isolation_after_s: still not isolated
            for me in ("a", "b"):
                assert n[me].last["network_ok"] and len(n[me].last["reached"]) == 2
            lab.heal(a, b)
            await _healthy(n, gw.address)


@needs_netns
def test_lab_is_removed_even_after_a_failure() -> None:
    def listed() -> str:
        return netns.sh("ip", "netns", "list").stdout

    with pytest.raises(RuntimeError, match="boom"), netns.Lab(["a", "b"]) as lab:
        proc = lab.spawn(lab["a"], "sleep", "30")
        assert lab.tag in listed()
        raise RuntimeError("boom")
    assert lab.tag not in listed()
    assert proc.poll() is not None
