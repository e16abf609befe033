"""Real servers for tests: etcd on free ports, processes stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hapair.shared.pki import TlsFiles

ROOT = Path(__file__).resolve().parents[2]
ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def default_sigint() -> None:
    """``preexec_fn`` for a process a test stops with SIGINT: it gets SIGINT as a
    terminal's Ctrl-C would give it. A shell without job control starts background jobs
    (a test run among them) with SIGINT ignored, and a child keeps an ignored signal
    ignored: Python then installs no handler for it and the process never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


@dataclass
class Etcd:
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hapair-etcd-"))
    proc: subprocess.Popen[bytes] | None = None
    name: str = "n1"
    initial_cluster: str = ""  # name=peer-url,...; empty: a cluster of this member alone
    scheme: str = "http"
    extra_args: list[str] = field(default_factory=list)  # TLS: tls_etcd.TlsEtcd

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    @property
    def tls(self) -> TlsFiles | None:
        """What a test's own client shows etcd: nothing in the lab mode (``http://``)."""
        return None

    def client_env(self, identity: str | None = None, kind: str = "agent") -> dict[str, str]:
        """``HAPAIR_ETCD*`` for a command or daemon that talks to this etcd as
        ``identity``, a certificate of ``kind`` (the admin when None; only over TLS does
        it matter)."""
        return {"HAPAIR_ETCD": self.url}

    def client_args(self, identity: str | None = None, kind: str = "agent") -> list[str]:
        """The same as command line options: ``--etcd URL`` and the TLS files."""
        return ["--etcd", self.url]

    def operator_env(self, name: str) -> dict[str, str]:
        """``hapair``'s environment for the operator ``name``: over TLS their
        certificate, whose CN names them; in the lab mode ``HAPAIR_OPERATOR``."""
        return {**self.client_env(), "HAPAIR_OPERATOR": name}

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
                "--pre-vote",  # off by default in etcd 3.4: see the README's "etcd in a plant"
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
            ["etcdctl", f"--endpoints={self.url}", "endpoint", "health"],
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


def etcd_client(etcd: Etcd | str) -> tuple[str, TlsFiles | None]:
    """The URL and TLS files a test's own client connects with: the admin's of a
    session etcd, none for a bare URL (an etcd in the lab mode, or none at all)."""
    return (etcd, None) if isinstance(etcd, str) else (etcd.url, etcd.tls)


class EtcdCluster:
    """Three (or ``size``) etcd members on one address, each stopped and started alone.

    A member started again keeps its data directory, so it rejoins as the same member."""

    def __init__(self, size: int = 3, host: str = "127.0.0.1") -> None:
        self.members = [Etcd(host=host, name=f"m{i}") for i in range(size)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    @property
    def url(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self) -> EtcdCluster:
        for m in self.members:  # together: a member is ready only once a quorum is up
            m.start(wait=False)
        for m in self.members:
            m.wait_ready()
        return self

    def leader(self) -> int:
        """The index of the member that leads the cluster now."""
        urls = [m.url for m in self.members]

        def find() -> int | None:
            out = subprocess.run(
                ["etcdctl", f"--endpoints={self.url}", "endpoint", "status", "-w", "json"],
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
