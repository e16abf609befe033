"""A whole site inside network namespaces: etcd on one lab host, an agent on each node
host, a client host; for the virtual IP tests, the partition drills and benchmarks.

Built on :class:`netns.Lab`. The test process itself stays in the machine's namespace
and reaches the lab's etcd through a small forwarder: a process that binds a port on
127.0.0.1 *before* it enters the etcd host's namespace, so accepted connections come
from the machine's side while the connections it opens go inside the lab. Nothing is
ever added to the machine's own interfaces.

Run as a script, this module is that forwarder:
``python -m tests.support.vip_lab forward NETNS HOST PORT`` prints the local port, then serves.

etcd runs with TLS and client certificates from a PKI made in the site's directory (its
certificate names its lab address and 127.0.0.1, where the forwarder is), each agent
shows its node's certificate, and each pair with a peer path gets a peer key; a site
made with ``secure=False`` runs the lab mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hapair.shared.pki import Kind
from tests.support.cluster import Cluster, recording_service, until
from tests.support.harness import ETCD, PYTHON, ROOT, Etcd, server_tls
from tests.support.netns import IFNAME, Host, Lab
from tests.support.tls_etcd import TestPki

ETCD_PORT = 2379
ETCD_CERT = "etcd-lab"  # etcd's certificate in a secure site
CLONE_NEWNET = 0x40000000

_FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())\n"
    "except Exception as e:\n"
    "    print('ERR', e); sys.exit(1)\n"
)


# ---- the forwarder (runs as its own process) ------------------------------------------


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _forward(netns: str, host: str, port: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    _enter_netns(netns)  # from here on, new sockets are inside the lab

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))

    server = await asyncio.start_server(handle, sock=listener)
    print(listener.getsockname()[1], flush=True)
    await server.serve_forever()


# ---- the site -------------------------------------------------------------------------


class LabCluster(Cluster):
    """A :class:`cluster.Cluster` whose agents run inside the lab's node hosts."""

    lab: Lab
    etcd_url: str  # as the agents reach it, inside the lab

    @property
    def agent_etcd(self) -> str:
        return self.etcd_url

    def etcd_args(self, identity: str | None = None, kind: str = Kind.AGENT) -> list[str]:
        """The options of a command run inside the lab that talks to etcd as ``identity``
        (the admin when None): etcd's URL in the lab and, over TLS, the files."""
        return ["--etcd", self.etcd_url, *self.etcd.client_args(identity, kind)[2:]]

    def spawn(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the agent: the PID is the agent's own.
        return subprocess.Popen(self.lab[node].argv(*argv), **kw)


class LabSite:
    """``async with LabSite(tmp, ["a", "b"]) as site``: hosts ``etcd``, the nodes and
    ``client`` on one switch, etcd running, ``site.cluster`` ready for agents."""

    def __init__(
        self,
        tmp: Path,
        nodes: Sequence[str],
        clients: Sequence[str] = ("client",),
        secure: bool = True,
    ):
        self.tmp = tmp
        self.pki = TestPki.create(tmp / "pki") if secure else None
        self.nodes = list(nodes)
        self.lab = Lab(["etcd", *self.nodes, *clients])
        self._forwarder: subprocess.Popen[bytes] | None = None
        self.etcd_proc: subprocess.Popen[bytes] | None = None
        self.cluster: LabCluster

    async def __aenter__(self) -> LabSite:
        self.lab.__enter__()
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def etcd_host(self) -> Host:
        return self.lab["etcd"]

    def __getitem__(self, name: str) -> Host:
        return self.lab[name]

    async def _start(self) -> None:
        host = self.etcd_host
        scheme, tls = "http", []
        if self.pki is not None:
            scheme = "https"
            tls = server_tls(self.pki.files(ETCD_CERT, Kind.ETCD, [host.address, "127.0.0.1"]))
        url = f"{scheme}://{host.address}:{ETCD_PORT}"
        peer = f"{scheme}://{host.address}:{ETCD_PORT + 1}"
        data = self.tmp / "etcd-data"
        self.etcd_proc = self.lab.spawn(
            host,
            ETCD, "--name", "n1", "--data-dir", str(data), "--logger", "zap",
            "--log-level", "error", "--listen-client-urls", url,
            "--advertise-client-urls", url, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"n1={peer}",
            "--initial-cluster-state", "new", *tls,
            # Its own cluster ID: labs share addresses, the agents' node locks are per
            # cluster ID (tests/chaos/etcd_members.py says why).
            "--initial-cluster-token", f"hapair-{os.getpid()}-{secrets.token_hex(4)}",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        forwarder = self._forward(host)
        assert forwarder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(forwarder.stdout.readline), 10)
        local_port = int(line)
        etcd = Etcd(
            host="127.0.0.1",
            client_port=local_port,
            data_dir=str(data),
            pki=self.pki,
            cert=ETCD_CERT,
        )
        self.cluster = LabCluster(etcd, self.tmp)
        self.cluster.lab = self.lab
        self.cluster.etcd_url = url

        async def ready() -> bool:
            await self.cluster.store.get("/hapair/v1/ready")
            return True

        await until(ready, 20, "etcd in the lab")

    def _forward(self, host: Host) -> subprocess.Popen[bytes]:
        self._forwarder = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "tests.support.vip_lab",
                "forward",
                host.ns,
                host.address,
                str(ETCD_PORT),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return self._forwarder

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if hasattr(self, "cluster"):
                await self.cluster.stop_all()
        if self._forwarder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._forwarder.kill()
            self._forwarder.wait(5)
            self._forwarder = None
        self.lab.close()

    # -- etcd faults ------------------------------------------------------------------
    def etcd_pid(self) -> int:
        assert self.etcd_proc is not None
        return self.etcd_proc.pid

    def stall_etcd(self, on: bool) -> None:
        os.kill(self.etcd_pid(), signal.SIGSTOP if on else signal.SIGCONT)

    # -- looking from the hosts ---------------------------------------------------------
    def node_entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "address": self.lab[name].address}


def service(name: str, port: int, record: Path, **extra: Any) -> dict[str, Any]:
    """The recording test service bound to every address (so the virtual one too)."""
    return recording_service(name, port, record, bind="0.0.0.0", **extra)


def addresses(host: Host) -> list[str]:
    """The IPv4 addresses on the host's lab interface, ``10.99.0.2/24`` style."""
    out = host.ip("-4", "-o", "addr", "show", "dev", IFNAME).stdout
    return re.findall(r"inet (\S+)", out)


def has(host: Host, cidr: str) -> bool:
    return cidr in addresses(host)


def mac(host: Host) -> str:
    out = host.ip("-o", "link", "show", IFNAME).stdout
    found = re.search(r"link/ether (\S+)", out)
    assert found is not None, out
    return found[1]


def neighbour(host: Host, ip: str) -> str | None:
    """The MAC ``host`` has in its ARP cache for ``ip``, if any."""
    out = host.ip("neigh", "show", ip, "dev", IFNAME).stdout
    found = re.search(r"lladdr (\S+)", out)
    return found[1] if found else None


def fetch(host: Host, url: str, timeout: float = 1.0) -> str | None:
    """GET ``url`` from inside ``host``; the body, or None on any failure."""
    out = host.run(PYTHON, "-I", "-c", _FETCH, url, str(timeout), timeout=timeout + 10, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


async def afetch(host: Host, url: str, timeout: float = 1.0) -> str | None:
    return await asyncio.to_thread(fetch, host, url, timeout)


async def until_has(host: Host, cidr: str, present: bool = True, timeout: float = 10.0) -> float:
    """Wait until ``cidr`` is (or is no longer) on ``host``; when it was seen so."""

    async def seen() -> float | None:
        return time.monotonic() if await asyncio.to_thread(has, host, cidr) == present else None

    what = f"{cidr} {'on' if present else 'gone from'} {host.name}"
    return await until(seen, timeout, what, step=0.01)


class VipWatch:
    """Where ``cidr`` is on two hosts, looked at in turn, back to back, for as long as
    the ``async with`` lasts.

    Two hosts cannot be read at one instant, so a sample of one host that saw the
    address, taken between two samples of the other host that both saw it, proves that
    both held it at once (``overlaps``). Waiting for the address to leave one host
    before looking at the other would prove nothing.
    """

    def __init__(self, first: Host, second: Host, cidr: str) -> None:
        self.hosts = (first, second)
        self.cidr = cidr
        self.samples: list[tuple[str, bool, float]] = []  # host, has it, when
        self._stop = threading.Event()
        self._first = threading.Event()  # one whole round taken: the start is seen
        self._task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> VipWatch:
        self._task = asyncio.ensure_future(asyncio.to_thread(self._run))
        await asyncio.to_thread(self._first.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def _run(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._stop.is_set()  # one whole round after the stop, to see the end
            for host in self.hosts:
                self.samples.append((host.name, has(host, self.cidr), time.monotonic()))
            self._first.set()

    def held(self, name: str) -> bool:
        """``name`` was seen holding the address during the watch."""
        return any(host == name and on for host, on, _ in self.samples)

    @property
    def overlaps(self) -> list[tuple[float, float]]:
        """(from, to) of each sandwich that proves both hosts held the address."""
        s = self.samples
        return [
            (s[i - 1][2], s[i + 1][2])
            for i in range(1, len(s) - 1)
            if s[i - 1][1] and s[i][1] and s[i + 1][1] and s[i - 1][0] == s[i + 1][0]
        ]


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "forward":
        sys.exit("usage: python -m tests.support.vip_lab forward NETNS HOST PORT")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_forward(sys.argv[2], sys.argv[3], int(sys.argv[4])))
