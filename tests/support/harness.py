"""Real servers for tests: etcd on free ports, processes stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hapair.shared.pki import Kind, TlsFiles

if TYPE_CHECKING:
    from tests.support.tls_etcd import TestPki

ROOT = Path(__file__).resolve().parents[2]
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
T = TypeVar("T")
# A condition is polled every FIRST_STEP_S at first, then less and less often, down to
# every LAST_STEP_S: most conditions hold within a few polls, and the long waits (a
# lease to expire, a database to clone) poll etcd or PostgreSQL, whose CPU the other
# tests running at the same time need.
FIRST_STEP_S, LAST_STEP_S = 0.01, 0.1


# Ports handed out below the kernel's ephemeral range (32768 and up): a port the kernel
# picked for a socket bound to port 0 was free when asked, and the kernel may hand it to
# any process a moment later (a service then failed with EADDRINUSE for good, a CI
# run). Each test process (pytest-xdist worker) has a block of its own, so two workers
# never hand out the same port; within it, ports go round from a random start.
PORTS_FROM, PORTS_PER_WORKER = 20000, 1500
_ports = itertools.count(random.randrange(PORTS_PER_WORKER))


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody uses on any address, TCP or UDP, from this process's block
    (``host``: where it will be used; it is free there too)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = PORTS_FROM + (int(worker) if worker.isdigit() else 0) % 8 * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = base + next(_ports) % PORTS_PER_WORKER
        if _unused(port) and _unused(port, host):
            return port
    raise AssertionError(f"no free port from {base} to {base + PORTS_PER_WORKER - 1}")


def _unused(port: int, host: str = "0.0.0.0") -> bool:
    """Bound on the wildcard address, a port clashes with any other binding of it."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> object:
    """Poll ``cond`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_err: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as err:  # the condition may race with a starting server
            last_err = err
        time.sleep(step)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_err})" if last_err else "")
    )


async def until(
    cond: Callable[[], Awaitable[T | None]],
    timeout: float,
    what: str,
    step: float | None = None,
) -> T:
    """Await ``cond`` until it returns something truthy; fail naming ``what`` after
    ``timeout`` seconds. Polled every ``step`` seconds when given (a test that times
    what it waits for), else every FIRST_STEP_S at first, slowing to LAST_STEP_S."""
    deadline = time.monotonic() + timeout
    wait = FIRST_STEP_S if step is None else step
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = await cond()
            if value:
                return value
            last = value
        except Exception as err:  # a server may be starting, or restarting
            last = err
        await asyncio.sleep(wait)
        if step is None:
            wait = min(wait * 1.5, LAST_STEP_S)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def comm_process(
    log: Path, args: list[str], env: dict[str, str] | None = None, run: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``hapair-comm`` with ``args``, its output appended to ``log``, none of this
    process's ``HAPAIR_*`` settings but ``env``'s; stopped by PID on leaving.
    ``run``: Python code that starts it instead of ``-m hapair.comm_server.main``."""
    start = ["-c", run] if run is not None else ["-m", "hapair.comm_server.main"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [PYTHON, *start, *args],
            cwd=ROOT,
            stdout=out,
            stderr=out,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")},
                "PYTHONPATH": str(ROOT),
                **(env or {}),
            },
        )
    try:
        yield proc
    finally:
        stop_pid(proc)


def default_sigint() -> None:
    """``preexec_fn`` for a process a test stops with SIGINT: it gets SIGINT as a
    terminal's Ctrl-C would give it. A shell without job control starts background jobs
    (a test run among them) with SIGINT ignored, and a child keeps an ignored signal
    ignored: Python then installs no handler for it and the process never sees it. A
    child also keeps the signal mask of the thread that forked it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def signal_state(pid: int) -> str:
    """How process ``pid`` takes signals (its masks, from /proc), for a test's message
    when one seems lost."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as err:
        return f"pid {pid}: {err}"
    return " ".join(line.replace("\t", "") for line in status.splitlines() if line[:3] == "Sig")


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: :func:`stop_pid` for a process
    started with asyncio."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


def server_tls(files: TlsFiles) -> list[str]:
    """An etcd member's TLS options: its certificate on both ports, every client and
    every peer checked against the CA."""
    own = ["--cert-file", str(files.cert), "--key-file", str(files.key)]
    own += ["--trusted-ca-file", str(files.ca), "--client-cert-auth"]
    peer = ["--peer-cert-file", str(files.cert), "--peer-key-file", str(files.key)]
    peer += ["--peer-trusted-ca-file", str(files.ca), "--peer-client-cert-auth"]
    return own + peer


@dataclass
class Etcd:
    """One etcd member, in the lab mode (plain ``http://``) unless given ``pki``: then TLS
    with client certificates on both ports, its own certificate ``cert`` of that PKI (whose
    SANs must list the addresses it is reached at), every client and peer showing one of
    the same CA (:mod:`tls_etcd`)."""

    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hapair-etcd-"))
    proc: subprocess.Popen[bytes] | None = None
    name: str = "n1"
    initial_cluster: str = ""  # name=peer-url,...; empty: a cluster of this member alone
    extra_args: list[str] = field(default_factory=list)
    pki: TestPki | None = None
    cert: str = "etcd-1"  # this member's certificate in ``pki``
    admin: str = "root"  # the identity a test's own client shows

    @property
    def scheme(self) -> str:
        return "http" if self.pki is None else "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    @property
    def tls(self) -> TlsFiles | None:
        """What a test's own client shows etcd: the admin's certificate, nothing in the
        lab mode (``http://``)."""
        return None if self.pki is None else self.identity(None)

    def identity(self, name: str | None, kind: str = Kind.AGENT) -> TlsFiles:
        """``name``'s files (a certificate of ``kind``, issued on first use), the
        admin's when None."""
        assert self.pki is not None, "the lab mode has no certificates"
        if name is None:
            return self.pki.files(self.admin, Kind.ADMIN)
        return self.pki.files(name, Kind(kind))

    def client_env(self, identity: str | None = None, kind: str = Kind.AGENT) -> dict[str, str]:
        """``HAPAIR_ETCD*`` for a command or daemon that talks to this etcd as
        ``identity``, a certificate of ``kind`` (the admin when None; only over TLS does
        it matter)."""
        if self.pki is None:
            return {"HAPAIR_ETCD": self.url}
        files = self.identity(identity, kind)
        return {
            "HAPAIR_ETCD": self.url,
            "HAPAIR_ETCD_CA": str(files.ca),
            "HAPAIR_ETCD_CERT": str(files.cert),
            "HAPAIR_ETCD_KEY": str(files.key),
        }

    def client_args(self, identity: str | None = None, kind: str = Kind.AGENT) -> list[str]:
        """The same as command line options: ``--etcd URL`` and the TLS files."""
        if self.pki is None:
            return ["--etcd", self.url]
        files = self.identity(identity, kind)
        return [
            *("--etcd", self.url, "--etcd-ca", str(files.ca)),
            *("--etcd-cert", str(files.cert), "--etcd-key", str(files.key)),
        ]

    def operator_env(self, name: str) -> dict[str, str]:
        """``hapair``'s environment for the operator ``name``: over TLS their
        certificate, whose CN names them; in the lab mode ``HAPAIR_OPERATOR``."""
        if self.pki is None:
            return {**self.client_env(), "HAPAIR_OPERATOR": name}
        return self.client_env(name, Kind.OPERATOR)

    def ctl_tls(self, identity: str | None = None) -> list[str]:
        """``etcdctl``'s options to show ``identity``'s certificate (the admin's when
        None) and check the member against the CA; none in the lab mode."""
        if self.pki is None:
            return []
        files = self.identity(identity)
        return [f"--cacert={files.ca}", f"--cert={files.cert}", f"--key={files.key}"]

    def server_args(self) -> list[str]:
        """The member's TLS options: its certificate on both ports, every client and
        every peer checked against the CA. None in the lab mode."""
        return [] if self.pki is None else server_tls(self.pki.files(self.cert, Kind.ETCD))

    def start(self, wait: bool = True) -> Etcd:
        peer = self.peer_url
        self.proc = subprocess.Popen(
            [
                ETCD,
                "--name",
                self.name,
                "--data-dir",
                self.data_dir,
                "--logger",
                "zap",
                "--log-level",
                "error",
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                self.initial_cluster or f"{self.name}={peer}",
                "--initial-cluster-state",
                "new",
                "--pre-vote",  # off by default in etcd 3.4: docs/operations.md, "etcd in a plant"
                *self.server_args(),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_for(lambda: port_open(self.host, self.client_port), 10, f"etcd on {self.url}")
        # The port opens a moment before the member accepts requests.
        wait_for(self._ready, 10, "etcd ready")

    def _ready(self) -> bool:
        out = subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", *self.ctl_tls(), "endpoint", "health"],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=5,
        )
        return out.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def plant_raft_timing() -> list[str]:
    """etcd's options for the raft timing of ``deploy/etcd/etcd.conf.yml``, the one
    shipped for a plant (with it etcd grants leases down to 1 s; with its defaults, 2 s)."""
    import yaml

    conf = yaml.safe_load((ROOT / "deploy" / "etcd" / "etcd.conf.yml").read_text())
    return [
        *("--heartbeat-interval", str(conf["heartbeat-interval"])),
        *("--election-timeout", str(conf["election-timeout"])),
    ]


def etcd_client(etcd: Etcd | str) -> tuple[str, TlsFiles | None]:
    """The URL and TLS files a test's own client connects with: the admin's of a
    session etcd, none for a bare URL (an etcd in the lab mode, or none at all)."""
    return (etcd, None) if isinstance(etcd, str) else (etcd.url, etcd.tls)


class EtcdCluster:
    """Three (or ``size``) etcd members on one address, each stopped and started alone:
    over TLS with ``pki`` (every member shows its certificate ``etcd-1``, issued for
    127.0.0.1), in the lab mode without.

    A member started again keeps its data directory, so it rejoins as the same member."""

    def __init__(self, size: int = 3, host: str = "127.0.0.1", pki: TestPki | None = None) -> None:
        self.members = [Etcd(host=host, name=f"m{i}", pki=pki) for i in range(size)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster
        self.pki = pki

    @property
    def url(self) -> str:
        return ",".join(m.url for m in self.members)

    # What a client is given: every member, with one member's TLS files.
    @property
    def tls(self) -> TlsFiles | None:
        return self.members[0].tls

    def client_args(self, identity: str | None = None, kind: str = Kind.AGENT) -> list[str]:
        return ["--etcd", self.url, *self.members[0].client_args(identity, kind)[2:]]

    def start(self) -> EtcdCluster:
        for m in self.members:  # together: a member is ready only once a quorum is up
            m.start(wait=False)
        for m in self.members:
            m.wait_ready()
        return self

    def leader(self) -> int:
        """The index of the member that leads the cluster now."""
        urls = [m.url for m in self.members]
        ctl = ["etcdctl", f"--endpoints={self.url}", *self.members[0].ctl_tls()]

        def find() -> int | None:
            out = subprocess.run(
                [*ctl, "endpoint", "status", "-w", "json"],
                capture_output=True,
                env={**os.environ, "ETCDCTL_API": "3"},
                timeout=5,
            )
            for item in json.loads(out.stdout or b"[]"):
                status = item["Status"]
                if status["header"]["member_id"] == status["leader"]:
                    return urls.index(item["Endpoint"])
            return None

        # wait_for wants a truthy value: member 0 is a leader too.
        return int(str(wait_for(lambda: (i := find()) is not None and str(i), 10, "a leader")))

    def stop(self, index: int) -> None:
        proc = self.members[index].proc
        if proc is not None:
            stop_pid(proc, signal.SIGKILL)
            self.members[index].proc = None

    def restart(self, index: int) -> None:
        self.members[index].start(wait=False)

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()


@contextlib.contextmanager
def running_etcd() -> Iterator[Etcd]:
    etcd = Etcd().start()
    try:
        yield etcd
    finally:
        etcd.cleanup()


PYTHON = sys.executable
