"""keepalived (Debian's package) on two lab hosts sharing a virtual address, to set
beside a hapair pair in the same lab (``bench/bench_keepalived.py``).

Each node runs ``keepalived --vrrp`` in the foreground inside its lab host, with its own
configuration, PID files and log in the run's directory, and the test service
(``svc.py``) bound to every address, so that a client reaching the virtual address learns
which node holds it. Both nodes start in BACKUP with ``nopreempt``: a node back from a
crash stays backup, as a hapair node comes back as standby (no automatic failback), so
the runs alternate between the nodes as hapair's do.

Faults, as for hapair's nodes, are made at the lab's switch: :func:`crash_host` (a server
crash: everything frozen, cable out, killed) and :func:`cut_between` (the link between
the two nodes: every IP packet from one to the other dropped, and the VRRP adverts they
multicast, which no address filter would catch, dropped at their switch ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import SVC, until
from tests.support.harness import PYTHON
from tests.support.netns import IFNAME, SINK, Host, Lab, process_gone, sh
from tests.support.vip_lab import has

KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"
VRRP_PROTOCOL = 112
# tc filter preference of the VRRP drop at a node's switch port: apart from the Lab's
# own (1 for loss, 100 and up for blocks), so that healing one leaves the others.
VRRP_PREF = 50
BACKUP_LOG = "Entering BACKUP STATE"


@dataclass(frozen=True)
class Vrrp:
    """One VRRP setting: seconds between adverts, and the protocol version."""

    advert_int: float
    version: int

    def __str__(self) -> str:
        return f"keepalived advert_int {self.advert_int:g} VRRPv{self.version}"


FASTEST = Vrrp(0.1, 3)  # VRRPv3 counts adverts in centiseconds, VRRPv2 in whole seconds
DEFAULTS = Vrrp(1.0, 2)  # keepalived's own defaults


def missing() -> str | None:
    """Why keepalived cannot run here, or None."""
    if not os.access(KEEPALIVED, os.X_OK):
        return "keepalived is not installed (make bench-sysdeps installs Debian's)"
    return None


def config(host: Host, vip: str, priority: int, vrrp: Vrrp, router_id: int) -> str:
    """keepalived.conf of one node: one VRRP instance holding ``vip`` on the lab link."""
    return f"""global_defs {{
    router_id {host.name}
    vrrp_version {vrrp.version}
}}

vrrp_instance hapair_bench {{
    state BACKUP
    nopreempt
    interface {IFNAME}
    virtual_router_id {router_id}
    priority {priority}
    advert_int {vrrp.advert_int:g}
    virtual_ipaddress {{
        {vip} dev {IFNAME}
    }}
}}
"""


def crash_host(lab: Lab, host: Host) -> list[int]:
    """A server crash as the wire sees it: every process of ``host`` frozen at once, its
    cable pulled, then killed. Killed, keepalived leaves its address configured: a crashed
    server does not answer on it, hence the cable. The PIDs it killed."""
    pids = host.pids()
    for pid in pids:  # frozen first, so that none reacts to another's death
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    lab.cut(host)
    kill(pids)
    return pids


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def drop_address(host: Host, cidr: str) -> None:
    """Remove ``cidr`` from the host if it is there: what a rebooted server starts without."""
    sh("ip", "-n", host.ns, "addr", "del", cidr, "dev", IFNAME, check=False)


def cut_between(lab: Lab, a: Host, b: Host) -> None:
    """Cut the link between two nodes, both still reaching every other host."""
    lab.partition(a, b)
    for host in (a, b):
        sh(
            "tc", "-n", lab.switch, "filter", "add", "dev", host.port, "ingress",
            "protocol", "ip", "pref", str(VRRP_PREF), "u32", "match", "ip", "protocol",
            str(VRRP_PROTOCOL), "0xff", "action", "mirred", "egress", "redirect", "dev", SINK,
        )  # fmt: skip


def heal_between(lab: Lab, a: Host, b: Host) -> None:
    lab.heal(a, b)
    for host in (a, b):
        sh(
            "tc", "-n", lab.switch, "filter", "del", "dev", host.port, "ingress",
            "pref", str(VRRP_PREF), check=False,
        )  # fmt: skip


class KeepalivedPair:
    """keepalived and the test service on two lab hosts, ``vip`` their virtual address."""

    def __init__(
        self,
        lab: Lab,
        hosts: Sequence[Host],
        vip: str,
        port: int,
        workdir: Path,
        vrrp: Vrrp,
        router_id: int = 51,
    ) -> None:
        self.lab = lab
        self.hosts = list(hosts)
        self.vip = vip
        self.port = port
        self.vrrp = vrrp
        self.router_id = router_id
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "record").mkdir(exist_ok=True)
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {h.name: [] for h in self.hosts}

    def _log(self, host: Host) -> Path:
        return self.dir / f"keepalived-{host.name}.log"

    def log(self, host: Host) -> str:
        path = self._log(host)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, host: Host) -> None:
        """keepalived and the test service on ``host``. The first node has the higher
        priority: it stays master when both are (started at once, or a cut link healed)."""
        priority = 150 if host == self.hosts[0] else 100
        conf = self.dir / f"keepalived-{host.name}.conf"
        conf.write_text(config(host, self.vip, priority, self.vrrp, self.router_id))
        pids = [self.dir / f"{host.name}.pid", self.dir / f"{host.name}-vrrp.pid"]
        # A killed keepalived leaves its PID files, which a reboot would clear (/run); its
        # VRRP child, reparented and maybe not yet reaped, would pass for a running one.
        for path in pids:
            path.unlink(missing_ok=True)
        with self._log(host).open("ab") as log:
            keepalived = self.lab.spawn(
                host, KEEPALIVED, "--vrrp", "--dont-fork", "--log-console", "--no-syslog",
                "--use-file", str(conf), "--pid", str(pids[0]), "--vrrp_pid", str(pids[1]),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        service = self.lab.spawn(
            host, PYTHON, SVC, "--service", "ka-svc", "--pair", "ka", "--node", host.name,
            "--bind", "0.0.0.0", "--port", str(self.port), "--record", str(self.dir / "record"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs[host.name] = [keepalived, service]

    def holders(self) -> list[Host]:
        """The nodes that have the address on their interface now."""
        return [h for h in self.hosts if has(h, self.vip)]

    async def started(self) -> Host:
        """Both nodes running, the first one master; that one."""
        first, second = self.hosts
        self.start(first)
        await until(lambda: asyncio.to_thread(has, first, self.vip), 15, "keepalived master")
        since = len(self.log(second))  # the log of an earlier start is kept
        self.start(second)
        await self.backup(second, since)
        return first

    async def backup(self, host: Host, since: int) -> None:
        """Wait until keepalived on ``host`` has said, past the first ``since`` characters
        of its log, that it is in BACKUP state, the other node still holding the address."""

        async def ready() -> bool:
            return BACKUP_LOG in self.log(host)[since:]

        await until(ready, 15, f"keepalived on {host.name} in BACKUP state", step=0.05)
        other = next(h for h in self.hosts if h != host)
        assert [h.name for h in self.holders()] == [other.name], "the address moved"

    def crash(self, host: Host) -> None:
        crash_host(self.lab, host)
        for proc in self.procs.pop(host.name, []):
            proc.wait(5)

    async def reboot(self, host: Host) -> None:
        """``host`` back after a crash: without the address, cable in, keepalived started
        again; returns once it is backup."""
        await asyncio.to_thread(wait_gone, host.pids())
        drop_address(host, self.vip)
        self.lab.restore(host)
        since = len(self.log(host))
        self.start(host)
        await self.backup(host, since)

    def stop(self) -> None:
        """Every process of both hosts killed by PID (keepalived's VRRP child is not ours
        to wait for), the address removed from both: the hosts as before :meth:`start`."""
        for host in self.hosts:
            pids = host.pids()
            kill(pids)
            for proc in self.procs.pop(host.name, []):
                proc.wait(5)
            wait_gone(pids)
            drop_address(host, self.vip)
        self.procs = {h.name: [] for h in self.hosts}
