"""The faults ``hapair drill`` inflicts on the node it runs on, and how it undoes them.

Each fault touches only processes proven to belong to the local agent of the node
(its boot id and PID from the node status, its command line naming the node), and
each fault that must be undone (a freeze, a partition) is undone in a ``finally`` and,
should the drill itself be killed, by a detached timer process that undoes it anyway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hapair.shared.agent_process import agent_node, alive
from hapair.shared.records import NodeStatus, local_boot_id

NFT_TABLE = "hapair_drill"
# Probe traffic carries this mark so the partition lets it through: the drill watches
# the pair from the faulted node and must still see the other nodes.
PROBE_MARK = 0x4850
COMMAND_TIMEOUT_S = 5.0
# The detached timer that undoes a fault fires this long after its planned end.
FAILSAFE_AFTER_S = 10.0


class FaultError(Exception):
    """The fault cannot be inflicted from here; the message says why."""


def local_agent(status: NodeStatus) -> int:
    """The PID of ``status``'s agent if it runs on this machine; else FaultError."""
    here = local_boot_id()
    if status.boot_id is None or here is None:
        raise FaultError(
            f"cannot tell whether the agent of {status.node} runs on this machine "
            "(no boot id in its status or here)"
        )
    if status.boot_id != here:
        raise FaultError(
            f"the active node {status.node} is another machine: run this drill on "
            f"{status.node} ({status.address}), or use --fault switchover, which works "
            "from anywhere"
        )
    if not alive(status.pid) or agent_node(status.pid) != status.node:
        raise FaultError(
            f"process {status.pid} is not the hapair agent of {status.node} on this machine"
        )
    return status.pid


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                kids = [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
                found.extend(kids)
                todo.extend(kids)
    return found


def crash(agent: int, extra: list[int]) -> int:
    """A server crash: the agent, everything it started and ``extra`` (the postmaster)
    die at one instant. Frozen first, so none of them reacts to the others dying."""
    pids = [agent, *descendants(agent), *(p for p in extra if alive(p))]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return len(pids)


def kill_service(agent: int, pid: int) -> None:
    """SIGKILL a service's process group, once proven a child of the agent."""
    if pid not in descendants(agent):
        raise FaultError(f"process {pid} is not a service of the local agent {agent}")
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        raise FaultError(f"service process {pid} is already gone") from None
    except PermissionError:
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _failsafe(command: str, after_s: float) -> Iterator[None]:
    """A detached ``sh`` that runs ``command`` after ``after_s`` unless we end it first."""
    timer = subprocess.Popen(
        ["sh", "-c", f"sleep {after_s:.1f}; {command}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(timer.pid, signal.SIGKILL)
        timer.wait()


@contextlib.contextmanager
def frozen(agent: int, duration_s: float) -> Iterator[None]:
    """The agent stopped (SIGSTOP) inside the block; always resumed on the way out."""
    with _failsafe(f"kill -CONT {agent}", duration_s + FAILSAFE_AFTER_S):
        os.kill(agent, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGCONT)


# ---- partition -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """What a partition blocks: whole hosts (the peers) and host:port pairs (etcd)."""

    hosts: tuple[str, ...]
    services: tuple[tuple[str, int], ...]


def _ipv4(host: str) -> list[str]:
    try:
        return [str(ipaddress.IPv4Address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise FaultError(f"cannot resolve {host}: {err}") from None
    return sorted({str(i[4][0]) for i in infos})


def plan_cut(peers: list[str], etcd: list[tuple[str, int]]) -> Cut:
    """Whole peers, and etcd's client ports only: other services on those hosts (a
    registry, for one) stay reachable."""
    hosts = sorted({ip for p in peers for ip in _ipv4(p)})
    services = {(ip, port) for host, port in etcd for ip in _ipv4(host)}
    return Cut(tuple(hosts), tuple(sorted(services)))


def ruleset(cut: Cut) -> str:
    """An nftables table of its own: deleting it heals everything at once."""
    out = [f"ip daddr {h} drop" for h in cut.hosts]
    out += [f"ip daddr {h} tcp dport {p} drop" for h, p in cut.services]
    inn = [f"ip saddr {h} drop" for h in cut.hosts]
    inn += [f"ip saddr {h} tcp sport {p} drop" for h, p in cut.services]
    lines = [
        f"table inet {NFT_TABLE} {{",
        "  chain out {",
        "    type filter hook output priority -10; policy accept;",
        f"    meta mark {PROBE_MARK:#x} ct mark set {PROBE_MARK:#x} accept",
        *(f"    {r}" for r in out),
        "  }",
        "  chain in {",
        "    type filter hook input priority -10; policy accept;",
        f"    ct mark {PROBE_MARK:#x} accept",
        *(f"    {r}" for r in inn),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft_missing() -> str | None:
    if shutil.which("nft") is None:
        return "nft is not installed (Debian package nftables): a partition cannot be made"
    return None


def same_netns(pid: int) -> bool:
    try:
        return os.readlink("/proc/self/ns/net") == os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False


def _nft(*args: str, stdin: str | None = None) -> None:
    try:
        out = subprocess.run(
            ["nft", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FaultError(f"nft {' '.join(args)}: no answer within {COMMAND_TIMEOUT_S} s") from None
    if out.returncode != 0:
        raise FaultError(f"nft {' '.join(args)}: {out.stderr.strip() or out.returncode}")


def heal() -> None:
    with contextlib.suppress(FaultError):
        _nft("delete", "table", "inet", NFT_TABLE)


@contextlib.contextmanager
def partitioned(cut: Cut, duration_s: float) -> Iterator[None]:
    """This node cut off from ``cut`` inside the block; always healed on the way out."""
    heal()  # a table left by a killed drill must not make this one fail
    undo = f"nft delete table inet {shlex.quote(NFT_TABLE)}"
    with _failsafe(undo, duration_s + FAILSAFE_AFTER_S):
        _nft("-f", "-", stdin=ruleset(cut))
        try:
            yield
        finally:
            heal()


def mark(sock: socket.socket) -> None:
    """Let the probe's packets through a partition (needs CAP_NET_ADMIN; else no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROBE_MARK)
