"""A three-member etcd whose members can be cut from each other but not from clients.

Each member runs in a host of its own in a :class:`netns.Lab` (the chaos suite's
:class:`~chaos.etcd_members.EtcdMembers`). Clients (agents, registries, the test itself)
stay in the machine's namespace and reach each member through a forwarder that lives
inside that member's host (``vip_lab.py forward``): the forwarder talks to its member
over the host's own interface, never through the switch. Partitioning a member from its
two peers at the switch therefore leaves it answering clients, as a member cut from its
quorum by a broken link between sites does, while SIGSTOP freezes a member whose socket
still accepts connections.

The members run with TLS and client certificates, each with a certificate of its own
from a PKI made in the lab's directory (one for 127.0.0.1 too: clients reach a member
through its forwarder there); ``secure=False`` gives the lab mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.chaos.etcd_members import CLIENT_PORT, EtcdMembers
from tests.support.harness import PYTHON, ROOT, stop_pid
from tests.support.netns import Lab
from tests.support.tls_etcd import TestPki

FORWARDER = ["-m", "tests.support.vip_lab"]


class EtcdLab(EtcdMembers):
    """``with EtcdLab(tmp) as etcd``: three members up, ``etcd.url`` for clients."""

    def __init__(
        self, root: Path, names: tuple[str, ...] = ("e0", "e1", "e2"), secure: bool = True
    ) -> None:
        pki = TestPki.create(root / "pki") if secure else None
        super().__init__(Lab(list(names)), names, root, pki)
        self.forwarders: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def __enter__(self) -> EtcdLab:
        self.lab.__enter__()
        try:
            self.start(wait=False)
            for name in self.names:
                self._forward(name)
            self.wait_healthy(self.names, 30.0)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- addresses ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Every member, as a client is given them."""
        return ",".join(self.client_url(n) for n in self.names)

    def client_url(self, name: str) -> str:
        """``name`` as clients reach it: its forwarder on 127.0.0.1."""
        return f"{self.scheme}://127.0.0.1:{self.ports[name]}"

    def member_of_port(self, port: int) -> str | None:
        return next((n for n, p in self.ports.items() if p == port), None)

    def _forward(self, name: str) -> None:
        host = self.lab[name]
        proc = subprocess.Popen(
            [PYTHON, *FORWARDER, "forward", host.ns, host.address, str(CLIENT_PORT)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.forwarders[name] = proc
        assert proc.stdout is not None
        self.ports[name] = int(proc.stdout.readline())

    def close(self) -> None:
        for proc in [*self.procs.values(), *self.forwarders.values()]:
            stop_pid(proc, signal.SIGKILL)
        self.lab.close()

    # -- faults -------------------------------------------------------------------------
    def cut_from_peers(self, name: str) -> None:
        """Drop every packet between ``name`` and the other members; clients still reach it."""
        for other in self.names:
            if other != name:
                self.lab.partition(self.lab[name], self.lab[other])

    def heal(self, name: str) -> None:
        for other in self.names:
            if other != name:
                self.lab.heal(self.lab[name], self.lab[other])

    def freeze(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGCONT)

    # -- the raft leadership ------------------------------------------------------------
    def member_id(self, name: str) -> int:
        out = self._ctl(f"--endpoints={self.client_url(name)}", "endpoint", "status", "-w", "json")
        return int(json.loads(out.stdout)[0]["Status"]["header"]["member_id"])

    def make_follower(self, name: str) -> None:
        """Move the raft leadership away from ``name`` if it has it: a fault on a follower
        leaves the quorum a leader, so clients have somewhere to go at once."""
        deadline = time.monotonic() + 20
        while (leader := self.leader()) == name or leader is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still leads the etcd cluster")
            if leader == name:
                to = next(n for n in self.names if n != name)
                self._ctl(
                    f"--endpoints={self.client_url(name)}", "move-leader", f"{self.member_id(to):x}"
                )
            time.sleep(0.2)


def connected_members(etcd: EtcdLab, pid: int) -> set[str]:
    """The members process ``pid`` holds an established TCP connection to."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=False
    )
    found = set()
    for line in out.stdout.splitlines():
        if f"pid={pid}," not in line:
            continue
        fields = line.split()
        with contextlib.suppress(IndexError, ValueError):
            member = etcd.member_of_port(int(fields[3].rsplit(":", 1)[1]))
            if member is not None:
                found.add(member)
    return found
