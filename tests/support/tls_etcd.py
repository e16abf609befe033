"""One etcd member with TLS and client-certificate authentication on its client and peer
ports, from certificates ``hapair pki`` issued, and ``etcdctl`` with a given identity."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hapair.shared import pki
from tests.support.harness import Etcd


class TlsEtcd(Etcd):
    """etcd on 127.0.0.1 with the ``etcd``-kind certificate ``name`` of ``pki_dir`` on
    both ports (its SANs must list 127.0.0.1); every client, and every peer, must show a
    certificate of the same CA. Ready once it answers ``admin``'s certificate."""

    def __init__(self, pki_dir: Path, admin: str, name: str = "etcd-1") -> None:
        files = pki.TlsFiles.issued(pki_dir, name)
        tls = ["--cert-file", str(files.cert), "--key-file", str(files.key)]
        tls += ["--trusted-ca-file", str(files.ca), "--client-cert-auth"]
        peer = ["--peer-cert-file", str(files.cert), "--peer-key-file", str(files.key)]
        peer += ["--peer-trusted-ca-file", str(files.ca), "--peer-client-cert-auth"]
        super().__init__(name=name, scheme="https", extra_args=tls + peer)
        self.pki_dir = pki_dir
        self.admin = admin

    def _ready(self) -> bool:
        return self.etcdctl("endpoint", "health", identity=self.admin).returncode == 0

    def etcdctl(
        self, *args: str, identity: str | None, pki_dir: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` showing ``identity``'s certificate of ``pki_dir`` (default: this
        member's), none when ``identity`` is None; the member checked against its CA."""
        tls = [f"--cacert={self.pki_dir / pki.CA_CERT}"]
        if identity is not None:
            directory = pki_dir or self.pki_dir
            cert, key = directory / f"{identity}.crt", directory / f"{identity}.key"
            tls += [f"--cert={cert}", f"--key={key}"]
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", "--dial-timeout=2s", *tls, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=15,
        )


@contextlib.contextmanager
def running_tls_etcd(pki_dir: Path, admin: str, name: str = "etcd-1") -> Iterator[TlsEtcd]:
    etcd = TlsEtcd(pki_dir, admin, name)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.cleanup()
