"""Network probes with real sockets: the peer path and probe targets on 127.x addresses
(whole nodes in network namespaces: tests/integration/test_probes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from hapair.shared.topology import format_errors
from hapair.workshop_agent.peer_path import PeerPath
from hapair.workshop_agent.peer_wire import Dropped, PeerAuth, Ping, Pong
from hapair.workshop_agent.probe_results import ProbeResult, next_verdict_change, summarize
from hapair.workshop_agent.probes import Network, NetworkProbes

FAST = {"probe_interval_s": 0.1, "isolation_after_s": 0.6}
A, B = "127.0.0.11", "127.0.0.12"
KEY = bytes(range(32))


def free_udp_port() -> int:
    # Bound on every address, so the port is free on each 127.x the test uses.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


async def eventually(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Wait until ``cond()`` is truthy; return the time it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def fast(port: int, targets: tuple[str, ...] = ()) -> Network:
    return Network(probe_targets=targets, peer_port=port, **FAST)


# ---- the network section ----------------------------------------------------------


def test_network_defaults() -> None:
    n = Network()
    assert n.model_dump() == {
        "probe_targets": (),
        "probe_interval_s": 1.0,
        "isolation_after_s": 5.0,
        "peer_port": 7400,
        "peer_key_file": None,
    }
    assert (n.timeout_s, n.visible_within_s) == (1.0, 3.0)
    assert Network(probe_targets=["10.0.0.1", "10.0.0.2:502", "[fd00::1]:4840"]).probe_targets == (
        "10.0.0.1",
        "10.0.0.2:502",
        "[fd00::1]:4840",
    )
    with pytest.raises(ValidationError):
        n.peer_port = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"probe_targets": ["10.0.0.1", "gw"]}, "probe_targets[1]: 'gw' is not an IP address"),
        ({"probe_targets": ["10.0.0.1:0"]}, "probe_targets[0]: port 0 is not from 1 to 65535"),
        ({"probe_targets": ["10.0.0.1:x"]}, "probe_targets[0]: port x is not from 1 to 65535"),
        ({"probe_targets": ["[fd00::1]"]}, "probe_targets[0]: '[fd00::1]' is not ADDRESS, ADDR"),
        ({"probe_targets": ["fd00::1"]}, "probe_targets[0]: ICMP probes are IPv4 only"),
        ({"probe_targets": ["10.0.0.1", "10.0.0.1"]}, "probe_targets: 10.0.0.1 is listed twice"),
        ({"probe_interval_s": 0}, "probe_interval_s: Input should be greater than or equal"),
        (
            {"probe_interval_s": 2.0, "isolation_after_s": 3.0},
            "isolation_after_s: isolation_after_s (3.0) must be at least twice probe_interval_s",
        ),
        ({"peer_port": 70000}, "peer_port: Input should be less than or equal to 65535"),
        ({"probe_target": []}, "probe_target: Extra inputs are not permitted"),
    ],
)
def test_network_errors_name_the_field(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as err:
        Network.model_validate(data)
    problems = format_errors(err.value)
    assert any(p.startswith(problem) for p in problems), problems


# ---- the verdict, pure ------------------------------------------------------------------

NET = Network(probe_targets=["10.0.0.1", "10.0.0.2:502"])  # visible within 3 s, isolated at 5 s


def r(since: float = 0.0, last_ok: float | None = None, sees_me: bool | None = None) -> ProbeResult:
    return ProbeResult(since=since, ok=last_ok is not None, last_ok=last_ok, sees_me=sees_me)


def test_summary_of_a_healthy_node() -> None:
    s = summarize(NET, {"asm-b": r(last_ok=9.5, sees_me=True)}, {"10.0.0.1": r(last_ok=9.8)}, 10.0)
    assert (s.network_ok, s.alarms) == (True, ())
    assert s.peers_visible == {"asm-b"} and s.targets_reached == {"10.0.0.1"}


def test_summary_gives_a_starting_node_time() -> None:
    # Nothing answered yet, but probing began 1 s ago: no alarm, not isolated.
    s = summarize(NET, {"asm-b": r(since=9.0)}, {"10.0.0.1": r(since=9.0)}, 10.0)
    assert (s.network_ok, s.alarms) == (True, ())
    assert not s.peers_visible and not s.peers_not_visible and not s.targets_reached


def test_summary_alarms() -> None:
    peers = {"asm-b": r(last_ok=7.0), "asm-c": r(last_ok=9.9, sees_me=False)}
    targets = {"10.0.0.1": r(last_ok=6.0), "10.0.0.2:502": r(since=0.0)}
    s = summarize(NET, peers, targets, 10.0)
    assert s.alarms == (
        "peer asm-b not visible for 3.0s",
        "asymmetric: asm-c does not see this node",
        "probe target 10.0.0.1 lost",
        "probe target 10.0.0.2:502 lost",
    )
    assert s.network_ok  # 10.0.0.1 answered 4 s ago, less than isolation_after_s
    assert s.peers_not_visible == {"asm-b"} and s.asymmetric == {"asm-c"}
    assert s.targets_reached == {"10.0.0.1"}


def test_network_ok_flips_after_isolation() -> None:
    targets = {"10.0.0.1": r(last_ok=5.0), "10.0.0.2:502": r(last_ok=4.0)}
    assert summarize(NET, {}, targets, 9.99).network_ok
    s = summarize(NET, {}, targets, 10.0)
    assert not s.network_ok
    assert s.alarms[-1] == "network isolated: no probe target answered for 5.0s"
    # Without probe targets a node is never called isolated.
    assert summarize(Network(), {"asm-b": r(last_ok=0.0)}, {}, 100.0).network_ok


def test_wire_format_round_trip_and_garbage() -> None:
    a, b = PeerAuth(KEY, ["b"]), PeerAuth(KEY, ["asm-b", "a"])
    for msg in (Ping("asm-b", 7), Pong("asm-b", "asm-a", 7, True), Pong("a", "b", 0, None)):
        assert b.open(PeerAuth(KEY, []).seal(msg)) == msg
    garbage = [
        b"",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"v": 1}',
        b'{"v": 2, "t": "ping", "from": "a", "seq": 1}',
        b'{"v": 1, "t": "ping", "from": "a", "seq": 1}',
        b"[" * 100_000,
        b"0" * 64 + b'{"v": 2, "t": "ping", "from": "a", "seq": 1, "run": "0", "born": 1, "n": 1}',
    ]
    assert all(isinstance(a.open(g), Dropped) for g in garbage)


# ---- the peer path on loopback ----------------------------------------------------------


@contextlib.asynccontextmanager
async def nodes(
    *specs: tuple[str, str, dict[str, str], Network],
) -> AsyncIterator[list[NetworkProbes]]:
    started: list[NetworkProbes] = []
    try:
        for me, address, peers, network in specs:
            probes = NetworkProbes(me, address, peers, network, PeerAuth(KEY))
            await probes.start()
            started.append(probes)
        yield started
    finally:
        for probes in started:
            await probes.close()


def visible(p: NetworkProbes, peer: str) -> bool:
    return peer in p.summary().peers_visible


async def test_peers_see_each_other() -> None:
    net = fast(free_udp_port())
    async with nodes(("asm-a", A, {"asm-b": B}, net), ("asm-b", B, {"asm-a": A}, net)) as (a, b):
        await eventually(lambda: visible(a, "asm-b") and visible(b, "asm-a"), 2.0, "both visible")
        # Each one's answers say it sees the other; no alarms on either side.
        await eventually(lambda: a.peers()["asm-b"].sees_me is True, 2.0, "asm-b sees asm-a")
        result = a.peers()["asm-b"]
        assert (
            result.ok and result.misses == 0 and result.rtt_ms is not None and result.rtt_ms < 100
        )
        assert a.summary().alarms == () and b.summary().alarms == ()


async def test_silent_peer_is_reported_within_the_misses() -> None:
    net = fast(free_udp_port())
    async with nodes(("asm-a", A, {"asm-b": B}, net), ("asm-b", B, {"asm-a": A}, net)) as (a, b):
        await eventually(lambda: visible(a, "asm-b"), 2.0, "asm-b visible")
        await b.close()
        took = await eventually(lambda: "asm-b" in a.summary().peers_not_visible, 10.0, "alarm")
        # interval x misses = 0.3 s after its last answer, which came at most one interval
        # before the close: never sooner than 0.2 s. The bound above is a liveness
        # deadline only (a loaded machine delays the pings' loop, not the rule).
        assert took > 0.15, took
        # The alarm says how long the peer has been silent: at least the misses' worth
        # (how much longer depends on how late this test reads it).
        silent = re.fullmatch(r"peer asm-b not visible for ([0-9.]+)s", a.summary().alarms[0])
        assert silent is not None and float(silent[1]) >= 0.2, a.summary().alarms
        assert a.peers()["asm-b"].misses >= 2


async def test_asymmetric_visibility() -> None:
    # asm-b answers asm-a, but its own pings go to a wrong address (a one-way fault):
    # asm-a learns from asm-b's answers that asm-b does not see it.
    net = fast(free_udp_port())
    async with nodes(
        ("asm-a", A, {"asm-b": B}, net), ("asm-b", B, {"asm-a": "127.0.0.99"}, net)
    ) as (a, b):
        await eventually(
            lambda: a.summary().asymmetric == {"asm-b"}, 2.0, "asymmetry seen by asm-a"
        )
        assert "asymmetric: asm-b does not see this node" in a.summary().alarms
        assert visible(a, "asm-b")
        await eventually(lambda: "asm-a" in b.summary().peers_not_visible, 2.0, "asm-b's alarm")


async def test_garbage_datagrams_are_ignored() -> None:
    port = free_udp_port()
    net = fast(port)
    # asm-c is configured but never runs: nothing may make it look visible.
    peers_a = {"asm-b": B, "asm-c": "127.0.0.13"}
    async with nodes(("asm-a", A, peers_a, net), ("asm-b", B, {"asm-a": A}, net)) as (a, _):
        await eventually(lambda: visible(a, "asm-b"), 2.0, "asm-b visible")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # asm-c's own address and port, guessing sequence numbers, without the key:
            # forged pongs.
            s.bind(("127.0.0.13", port))
            forger = PeerAuth(bytes(32), [])
            pongs = [Pong("asm-c", "asm-a", seq, True) for seq in range(0, 2**32, 2**26)]
            forged = [forger.seal(p) for p in pongs]
            for payload in [b"", b"\x00" * 9000, b"{", b'{"v":1,"t":"pong"}', *forged]:
                s.sendto(payload, (A, port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # Pings get no answer without the key, nor from a node not of the pair.
            s.bind(("127.0.0.14", 0))
            s.settimeout(0.5)
            s.sendto(PeerAuth(bytes(32), []).seal(Ping("asm-b", 42)), (A, port))
            s.sendto(PeerAuth(KEY, []).seal(Ping("stranger", 43)), (A, port))
            # Received off the loop: the responder answers on this test's own loop.
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(s.recv, 512)
        await asyncio.sleep(0.4)
        assert visible(a, "asm-b") and not visible(a, "asm-c")
        assert a.peer_path is not None
        assert a.peer_path.dropped["bad MAC"] >= len(forged) + 1
        assert a.peer_path.dropped["not a peer"] == 1
        assert a.peers()["asm-c"].last_ok is None


async def test_only_the_waiting_ping_is_answered() -> None:
    clock = [100.0]  # moved by hand: a pong later than the timeout is no answer
    net = fast(free_udp_port())
    path = PeerPath("asm-a", {"asm-b": B}, net, PeerAuth(KEY), clock=lambda: clock[0])
    as_b = PeerAuth(KEY, ["asm-a"])
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        b.bind((B, net.peer_port))  # plays asm-b by hand
        other.bind(("127.0.0.14", net.peer_port))
        await path.open(A)
        try:
            path.probe()
            ping = as_b.open(await asyncio.to_thread(b.recv, 512))
            assert isinstance(ping, Ping) and ping.sender == "asm-a"
            wrong = [
                (b, Pong("asm-b", "asm-a", (ping.seq + 1) % 2**32, True)),  # not the ping sent
                (b, Pong("asm-b", "asm-x", ping.seq, True)),  # for another node
                (other, Pong("asm-b", "asm-a", ping.seq, True)),  # from the wrong address
            ]
            for sock, pong in wrong:
                sock.sendto(as_b.seal(pong), (A, net.peer_port))
            await asyncio.sleep(0.1)
            clock[0] += net.timeout_s + 0.01
            late = as_b.seal(Pong("asm-b", "asm-a", ping.seq, True))
            b.sendto(late, (A, net.peer_port))
            await asyncio.sleep(0.1)
            assert path.results()["asm-b"].last_ok is None
            path.probe()
            assert path.results()["asm-b"].misses == 1
            ping = as_b.open(await asyncio.to_thread(b.recv, 512))
            assert isinstance(ping, Ping)
            b.sendto(as_b.seal(Pong("asm-b", "asm-a", ping.seq, False)), (A, net.peer_port))
            await eventually(lambda: path.results()["asm-b"].ok, 1.0, "the right pong counted")
            assert path.results()["asm-b"].sees_me is False
        finally:
            path.close()


# ---- probe targets ------------------------------------------------------------------------


async def test_tcp_targets_up_and_down() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = f"127.0.0.1:{port}"
    try:
        async with nodes(("asm-a", A, {}, fast(free_udp_port(), (target,)))) as (a,):
            await eventually(lambda: a.summary().targets_reached == {target}, 2.0, "reached")
            server.close()
            await server.wait_closed()
            await eventually(lambda: a.summary().targets_lost == {target}, 2.0, "lost")
            result = a.target_results()[target]
            assert not result.ok and result.detail == "Connection refused"
            await eventually(lambda: not a.summary().network_ok, 2.0, "isolated")
    finally:
        server.close()


async def test_icmp_target_on_loopback() -> None:
    async with nodes(("asm-a", A, {}, fast(free_udp_port(), ("127.0.0.1",)))) as (a,):
        await eventually(lambda: a.summary().targets_reached == {"127.0.0.1"}, 2.0, "echo reply")
        result = a.target_results()["127.0.0.1"]
        assert result.ok and result.rtt_ms is not None and result.rtt_ms < 100


# ---- whole nodes in network namespaces ------------------------------------------------------

# One node's probing, run inside a namespace; prints its summary as JSON every 50 ms.
NODE = """
import asyncio, json, sys
from hapair.workshop_agent.peer_wire import PeerAuth
from hapair.workshop_agent.probes import Network, NetworkProbes

async def main():
    cfg = json.loads(sys.argv[1])
    net = Network.model_validate(cfg["network"])
    auth = PeerAuth(bytes(range(32)))
    async with NetworkProbes(cfg["me"], cfg["address"], cfg["peers"], net, auth) as probes:
        while True:
            s = probes.summary()
            details = {t: r.detail for t, r in probes.target_results().items()}
            print(json.dumps({
                "network_ok": s.network_ok, "alarms": s.alarms, "details": details,
                "visible": sorted(s.peers_visible), "reached": sorted(s.targets_reached),
                "lost": sorted(s.targets_lost),
            }), flush=True)
            await asyncio.sleep(0.05)

asyncio.run(main())
"""

# A TCP service on the gateway: accepts and closes.
LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    s.accept()[0].close()
"""


def test_the_verdict_changes_when_silence_alone_says_so() -> None:
    """The agent's loop sleeps until the probes' verdict can change by itself: each
    instant is the first at which ``summarize`` says otherwise with no new answer."""
    network = fast(7400, ("127.0.0.9:80",))  # window = misses x interval; isolation 0.6 s
    window = network.visible_within_s
    peers = {"asm-b": ProbeResult(since=0.0, ok=True, last_ok=10.0)}
    targets = {"127.0.0.9:80": ProbeResult(since=0.0, ok=True, last_ok=10.2)}
    at = next_verdict_change(network, peers, targets, 10.25)
    assert at == pytest.approx(10.0 + window)
    for t in (at - 0.001, at + 0.001):
        assert ("asm-b" in summarize(network, peers, targets, t).peers_not_visible) == (t > at)
    # Past the peer's window: the target's, then isolation.
    at2 = next_verdict_change(network, peers, targets, 10.0 + window)
    assert at2 == pytest.approx(10.2 + window)
    at3 = next_verdict_change(network, peers, targets, 10.2 + window)
    assert at3 == pytest.approx(10.2 + 0.6)
    assert summarize(network, peers, targets, at3 - 0.001).network_ok
    assert not summarize(network, peers, targets, at3 + 0.001).network_ok
    assert next_verdict_change(network, peers, targets, 11.0) is None
