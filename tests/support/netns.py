"""Hosts in network namespaces on a private switch, for partition and chaos tests.

A :class:`Lab` builds N hosts. Each host is a network namespace with one veth
(``hp-eth0``, an address in the lab's private subnet) whose other end is a port of a
bridge in the lab's own "switch" namespace. Nothing is ever created in the machine's
own namespace: each veth is created inside a host's namespace with its peer placed
straight into the switch's, so deleting the namespaces removes everything.

Faults are made at the switch, as a pulled cable or a badly configured switch would:

- ``cut(host)`` / ``restore(host)``: the host's switch port down / up;
- ``block(src, dst)`` (one way), ``partition(a, b)`` (both ways), ``heal(a, b)``: IP
  packets from one host to the other are dropped at the switch port. A ``tc`` u32
  filter redirects them (``mirred``) to a sink device that is kept down, which drops
  them: this needs neither iptables, nftables nor the tc ``gact`` action;
- ``loss(host, percent)``: random drops both ways (netem where the kernel has it, else
  a classic-BPF random filter with the same sink);
- ``delay(host, ms)``: netem only; raises :class:`Unsupported` on kernels without it
  (no qdisc but netem can hold a packet for a set time).

Every command is bounded in time. :meth:`Lab.close` (or leaving ``with Lab(...)``)
kills every process still running in the lab's namespaces, by PID, and deletes them.
A program that drives a whole lab from inside it (the chaos suite) moves itself into
one of the hosts with :meth:`Lab.enter`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PREFIX = "hp-lab"
BRIDGE = "hp-br0"
SINK = "hp-sink"
IFNAME = "hp-eth0"
CMD_TIMEOUT_S = 10.0
STALE_AFTER_S = 300.0
CLONE_NEWNET = 0x40000000
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # "hp-" + name fits in an interface name
_labs = itertools.count()
_WITH_CGROUPS = (
    "grep -q ' - cgroup2 ' /proc/self/mountinfo"
    ' || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec "$@"'
)

# Classic BPF (tc "bytecode" syntax): load a random u32, match when below the threshold.
# A match runs the filter's action (redirect to the sink). {k} = percent * 2**32 / 100.
_RANDOM_BPF = "4,32 0 0 4294963256,53 1 0 {k},6 0 0 4294967295,6 0 0 0"


class NetnsError(RuntimeError):
    pass


class Unsupported(NetnsError):
    """The kernel lacks what this fault needs (for example netem)."""


def sh(
    *argv: str, timeout: float = CMD_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; raise :class:`NetnsError` naming it on failure."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no result after {timeout}s") from None
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {out.stderr.strip() or f'exit {out.returncode}'}")
    return out


def unavailable() -> str | None:
    """Why labs cannot be built here (not root, no iproute2), or None when they can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"{PREFIX}{os.getpid()}check"
    try:
        out = sh("ip", "netns", "add", name, check=False)
    except NetnsError as err:
        return str(err)
    if out.returncode != 0:
        return f"`ip netns add` failed (root needed): {out.stderr.strip()}"
    sh("ip", "netns", "del", name, check=False)
    return None


def _alive(pid: int) -> bool:
    """Running, or stopped; not a zombie waiting for its parent to read its status."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone)."""
    return not _alive(pid)


def _pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _kill_namespace(ns: str) -> None:
    """Kill what still runs in ``ns`` (by PID, as listed by ``ip netns pids``), delete it.

    The calling process is spared: it may have entered the namespace (:meth:`Lab.enter`)."""
    pids = [p for p in _pids(ns) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    sh("ip", "netns", "del", ns, check=False)


def _lab_namespaces(pid: int) -> list[str]:
    out = sh("ip", "netns", "list", check=False)
    names = (line.split(" ", 1)[0] for line in out.stdout.splitlines())
    return [n for n in names if re.match(rf"^{PREFIX}{pid}x\d+-", n)]


def remove_labs_of(pid: int) -> list[str]:
    """Delete at once the namespaces of every lab made by process ``pid``.

    For a parent whose child driving a lab had to be killed: the child could not clean
    up, and the parent knows it is gone, so the age rule of :func:`remove_stale` is
    not needed."""
    if _alive(pid) and pid != os.getpid():
        raise NetnsError(f"process {pid} still runs: it removes its own labs")
    names = _lab_namespaces(pid)
    # The switch last: hosts' veths vanish with their namespaces anyway.
    for name in sorted(names, key=lambda n: n.endswith("-sw")):
        _kill_namespace(name)
    return names


def remove_stale() -> list[str]:
    """Delete namespaces left by labs whose test process is gone (a killed run)."""
    out = sh("ip", "netns", "list", check=False)
    removed = []
    for line in out.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = re.match(rf"^{PREFIX}(\d+)x\d+-", name)
        if match is None or _alive(int(match[1])):
            continue
        # Old enough too: the PID may belong to another PID namespace sharing /run/netns.
        with contextlib.suppress(OSError):
            if time.time() - os.stat(f"/run/netns/{name}").st_mtime > STALE_AFTER_S:
                _kill_namespace(name)
                removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    address: str
    port: str  # its port on the switch, in the switch's namespace
    ifname: str = IFNAME

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside this host (for subprocess or asyncio subprocesses).

        ``ip netns exec`` mounts a fresh /sys without the cgroup v2 hierarchy: mounted
        again (in the command's own mount namespace), a host's agent puts each service
        in a cgroup as on a real server, instead of falling back to process groups."""
        return ["ip", "netns", "exec", self.ns, "sh", "-c", _WITH_CGROUPS, "sh", *cmd]

    def run(
        self, *cmd: str, timeout: float = CMD_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*cmd), timeout=timeout, check=check)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip`` inside this host, e.g. ``host.ip("route", "add", "blackhole", net)``."""
        return sh("ip", "-n", self.ns, *args)

    def pids(self) -> list[int]:
        """Every process running in this host: what a power cut of it would stop."""
        return _pids(self.ns)


class Lab:
    """N hosts on one switch; use as a context manager so that it is always removed."""

    def __init__(self, hosts: Sequence[str], subnet: str = "10.99.0.0/24") -> None:
        net = ipaddress.IPv4Network(subnet)
        bad = [h for h in hosts if not _HOST_NAME.match(h)]
        if bad or len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be unique, [a-z][a-z0-9]{{0,9}}: {list(hosts)}")
        if len(hosts) > net.num_addresses - 2:
            raise ValueError(f"{subnet} is too small for {len(hosts)} hosts")
        self.tag = f"{PREFIX}{os.getpid()}x{next(_labs)}"
        self.switch = f"{self.tag}-sw"
        self.prefixlen = net.prefixlen
        self.hosts = {
            name: Host(name, f"{self.tag}-{name}", str(addr), f"hp-{name}")
            for name, addr in zip(hosts, net.hosts(), strict=False)
        }
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._rules: dict[tuple[str, str], int] = {}  # (src, dst) -> tc filter pref
        self._prefs = itertools.count(100)
        self._netem: bool | None = None

    # -- building and removing --------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def build(self) -> None:
        remove_stale()
        self._add_ns(self.switch)
        self._sw("link", "add", BRIDGE, "type", "bridge")
        self._sw("link", "set", BRIDGE, "up")
        # Kept down for good: whatever is redirected to it is dropped.
        self._sw("link", "add", SINK, "type", "ifb")
        for host in self.hosts.values():
            self._attach(host)

    def _attach(self, host: Host) -> None:
        self._add_ns(host.ns)
        host.ip(
            "link",
            "add",
            host.ifname,
            "type",
            "veth",
            "peer",
            "name",
            host.port,
            "netns",
            self.switch,
        )
        self._sw("link", "set", host.port, "master", BRIDGE)
        self._sw("link", "set", host.port, "up")
        self._tc("qdisc", "add", "dev", host.port, "clsact")
        host.ip("addr", "add", f"{host.address}/{self.prefixlen}", "dev", host.ifname)
        host.ip("link", "set", host.ifname, "up")

    def close(self) -> None:
        """Stop the processes, then delete every namespace; never raises."""
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
        self._procs.clear()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(NetnsError):
                _kill_namespace(ns)
        self._namespaces.clear()

    def spawn(self, host: Host, *cmd: str, **popen: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside ``host``; it is killed at :meth:`close` if still running."""
        self._procs = [p for p in self._procs if p.poll() is None]
        proc = subprocess.Popen(host.argv(*cmd), **popen)
        self._procs.append(proc)
        return proc

    def enter(self, host: Host) -> None:
        """Move this process into ``host``'s network, to reach every host of the lab.

        Only the calling thread moves; threads started later inherit its namespace. So
        this must run before any other thread exists (gRPC, executors), and only in a
        process of its own, never in a test runner that shares the machine's network
        with other tests. Namespaces are still made and removed by name afterwards."""
        if threading.active_count() != 1:
            raise NetnsError("enter() needs a single-threaded process: other threads would stay")
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{host.ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns into {host.ns}: {os.strerror(err)}")
        finally:
            os.close(fd)

    # -- faults -------------------------------------------------------------------------
    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch; the host sees its carrier drop."""
        self._sw("link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        self._sw("link", "set", host.port, "up")

    def block(self, src: Host, dst: Host) -> None:
        """Drop IP packets from ``src`` to ``dst`` (one way) at ``src``'s switch port."""
        if (src.name, dst.name) in self._rules:
            return
        pref = next(self._prefs)
        match = [
            "u32",
            "match",
            "ip",
            "src",
            f"{src.address}/32",
            "match",
            "ip",
            "dst",
            f"{dst.address}/32",
        ]
        self._drop(src.port, "ingress", pref, match)
        self._rules[(src.name, dst.name)] = pref

    def unblock(self, src: Host, dst: Host) -> None:
        pref = self._rules.pop((src.name, dst.name), None)
        if pref is not None:
            self._tc("filter", "del", "dev", src.port, "ingress", "pref", str(pref))

    def partition(self, a: Host, b: Host) -> None:
        self.block(a, b)
        self.block(b, a)

    def heal(self, a: Host, b: Host) -> None:
        self.unblock(a, b)
        self.unblock(b, a)

    def loss(self, host: Host, percent: float) -> None:
        """Drop ``percent`` % of the host's IP packets, in each direction."""
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        self.clear(host)
        if self.netem_available():
            self._netem_both(host, "loss", f"{percent}%")
            return
        k = min(round(percent / 100 * 2**32), 2**32 - 1)
        match = ["bpf", "bytecode", _RANDOM_BPF.format(k=k)]
        self._drop(host.port, "ingress", 1, match)
        self._drop(host.port, "egress", 1, match)

    def delay(self, host: Host, ms: float) -> None:
        """Delay the host's packets by ``ms`` in each direction (netem only)."""
        if not self.netem_available():
            raise Unsupported(
                "tc netem is not in this kernel (CONFIG_NET_SCH_NETEM): delay cannot be emulated"
            )
        self.clear(host)
        self._netem_both(host, "delay", f"{ms}ms")

    def clear(self, host: Host) -> None:
        """Remove the loss or delay of ``host`` (blocks stay)."""
        host.ip("link", "show", host.ifname)  # the host must exist; fail loudly if not
        sh("tc", "-n", host.ns, "qdisc", "del", "dev", host.ifname, "root", check=False)
        self._tc("qdisc", "del", "dev", host.port, "root", check=False)
        for hook in ("ingress", "egress"):
            self._tc("filter", "del", "dev", host.port, hook, "pref", "1", check=False)

    def netem_available(self) -> bool:
        if self._netem is None:
            out = self._tc("qdisc", "add", "dev", SINK, "root", "netem", check=False)
            self._netem = out.returncode == 0
            if self._netem:
                self._tc("qdisc", "del", "dev", SINK, "root", check=False)
        return self._netem

    # -- plumbing -------------------------------------------------------------------------
    def _sw(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.switch, *args)

    def _tc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("tc", "-n", self.switch, *args, check=check)

    def _drop(self, port: str, hook: str, pref: int, match: list[str]) -> None:
        self._tc(
            "filter", "add", "dev", port, hook, "protocol", "ip", "pref", str(pref),
            *match, "action", "mirred", "egress", "redirect", "dev", SINK,
        )  # fmt: skip

    def _netem_both(self, host: Host, *spec: str) -> None:
        sh("tc", "-n", host.ns, "qdisc", "add", "dev", host.ifname, "root", "netem", *spec)
        self._tc("qdisc", "add", "dev", host.port, "root", "netem", *spec)
