"""One etcd member with TLS and client-certificate authentication on its client and peer
ports, from certificates ``hapair pki`` issued, and ``etcdctl`` with a given identity.

:class:`TestPki` is a test process's PKI: one CA, a certificate issued the first time a
name asks for one and a pair's peer key likewise, so that a whole session pays for its
keys once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hapair.shared import pki
from tests.support.harness import Etcd

ETCD_NAME = "etcd-1"
ADMIN = "root"
# Kinds whose certificates also serve (they need the address clients connect to).
SERVING = {pki.Kind.ETCD, pki.Kind.REGISTRY, pki.Kind.COMM}


class TestPki:
    """The CA of ``directory`` and what it issued; :meth:`create` makes a new one."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()

    @classmethod
    def create(cls, directory: Path, site: str = "tests") -> TestPki:
        """A new CA in ``directory``, with etcd's certificate and the admin's."""
        made = cls(directory)
        pki.init(directory, site)
        made.files(ETCD_NAME, pki.Kind.ETCD)
        made.files(ADMIN, pki.Kind.ADMIN)
        return made

    def files(
        self, name: str, kind: pki.Kind = pki.Kind.AGENT, ips: Sequence[str] = ("127.0.0.1",)
    ) -> pki.TlsFiles:
        """``name``'s CA, certificate and key, issued as ``kind`` unless it already was
        (one that serves, for ``ips``)."""
        with self._lock:
            if not (self.dir / f"{name}.crt").exists():
                pki.issue(self.dir, kind, name, ips if kind in SERVING else [])
        return pki.TlsFiles.issued(self.dir, name)

    def postgres(self, address: str) -> pki.TlsFiles:
        """The certificate of a PostgreSQL server on ``address`` (named after it: a test's
        node names come with other addresses in other tests), issued on first use."""
        name = f"postgres@{address}"
        with self._lock:
            if not (self.dir / f"{name}.crt").exists():
                pki.issue(self.dir, pki.Kind.POSTGRES, name, [address])
        return pki.TlsFiles.issued(self.dir, name)

    def peer_key(self, pair: str) -> Path:
        """The pair's peer key file (0600), made the first time it is asked for."""
        path = self.dir / f"peer-{pair}.key"
        with self._lock:
            if not path.exists():
                pki.peer_key(self.dir, pair)
        return path


class TlsEtcd(Etcd):
    """etcd on 127.0.0.1 with the ``etcd``-kind certificate ``name`` of ``pki_dir`` on
    both ports (its SANs must list 127.0.0.1); every client, and every peer, must show a
    certificate of the same CA. Ready once it answers ``admin``'s certificate. ``where``:
    the other fields of :class:`Etcd` (host, ports, data directory)."""

    def __init__(self, pki_dir: Path, admin: str, name: str = ETCD_NAME, **where: Any) -> None:
        super().__init__(name=name, pki=TestPki(pki_dir), cert=name, admin=admin, **where)
        self.pki_dir = pki_dir

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
def running_tls_etcd(pki_dir: Path, admin: str, name: str = ETCD_NAME) -> Iterator[TlsEtcd]:
    etcd = TlsEtcd(pki_dir, admin, name)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.cleanup()


LAB_HELP = (
    "the lab mode: etcd over plain http, no certificates, no peer keys "
    "(default: etcd over TLS with client certificates, a certificate per agent and a "
    "peer key per pair)"
)


def own_etcd(directory: Path, lab: bool = False, extra_args: Sequence[str] = ()) -> Etcd:
    """An etcd of its own, started (a benchmark's): TLS with client certificates from a
    new PKI in ``directory``, the secure default; plain ``http://`` with ``lab``.
    ``extra_args``: more of etcd's options (its raft timing, say)."""
    if lab:
        return Etcd(extra_args=list(extra_args)).start()
    return TlsEtcd(TestPki.create(directory).dir, ADMIN, extra_args=list(extra_args)).start()


def etcd_mode(lab: bool) -> str:
    """What a benchmark prints of the mode it measures."""
    if lab:
        return "the lab mode (plain http etcd, no certificates, no peer keys)"
    return "secure (etcd over TLS, client certificates, peer keys)"
