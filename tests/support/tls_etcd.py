"""One etcd member with TLS and client-certificate authentication on its client and peer
ports, from certificates ``hapair pki`` issued, and ``etcdctl`` with a given identity."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hapair.shared import pki
from tests.support.harness import ETCD, free_port, port_open, stop_pid, wait_for


@dataclass
class TlsEtcd:
    """etcd on 127.0.0.1 with the ``etcd``-kind certificate ``name`` of ``pki_dir`` for
    both ports (its SANs must list 127.0.0.1); every client must show a certificate of
    the same CA."""

    pki_dir: Path
    name: str = "etcd-1"
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hapair-etcd-tls-"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.host}:{self.peer_port}"

    def start(self, admin: str) -> TlsEtcd:
        """Start the member and wait until it answers ``admin`` (a client certificate)."""
        files = pki.TlsFiles.issued(self.pki_dir, self.name)
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
                self.peer_url,
                "--initial-advertise-peer-urls",
                self.peer_url,
                "--initial-cluster",
                f"{self.name}={self.peer_url}",
                "--initial-cluster-state",
                "new",
                "--cert-file",
                str(files.cert),
                "--key-file",
                str(files.key),
                "--trusted-ca-file",
                str(files.ca),
                "--client-cert-auth",
                "--peer-cert-file",
                str(files.cert),
                "--peer-key-file",
                str(files.key),
                "--peer-trusted-ca-file",
                str(files.ca),
                "--peer-client-cert-auth",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.host, self.client_port), 10, f"etcd on {self.url}")
        wait_for(
            lambda: self.etcdctl("endpoint", "health", identity=admin).returncode == 0,
            10,
            f"etcd on {self.url} answering {admin}",
        )
        return self

    def etcdctl(
        self, *args: str, identity: str | None, ca: Path | None = None, pki_dir: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` showing ``identity``'s certificate of ``pki_dir`` (default: this
        member's), none when ``identity`` is None; the server checked against ``ca``."""
        directory = pki_dir or self.pki_dir
        tls = [f"--cacert={ca or self.pki_dir / pki.CA_CERT}"]
        if identity is not None:
            tls += [
                f"--cert={directory / f'{identity}.crt'}",
                f"--key={directory / f'{identity}.key'}",
            ]
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", "--dial-timeout=2s", *tls, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=15,
        )

    def cleanup(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        shutil.rmtree(self.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_tls_etcd(pki_dir: Path, admin: str, name: str = "etcd-1") -> Iterator[TlsEtcd]:
    etcd = TlsEtcd(pki_dir, name)
    try:
        yield etcd.start(admin)
    finally:
        etcd.cleanup()
