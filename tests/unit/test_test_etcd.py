"""The tests' own etcds are secure when given a PKI, and in the lab mode only without one:
every member asks every client and every peer for a certificate of the CA, every client
is given its own, and a relay reads the frames only of a TLS it ends itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapair.shared import pki
from tests.support.etcd_relay import EtcdRelay, reading_relay
from tests.support.harness import Etcd, EtcdCluster
from tests.support.tls_etcd import ADMIN, TestPki, TlsEtcd


@pytest.fixture
def test_pki(tmp_path: Path) -> TestPki:
    return TestPki.create(tmp_path / "pki")


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_a_member_given_a_pki_asks_clients_and_peers_for_a_certificate(
    test_pki: TestPki, tmp_path: Path
) -> None:
    etcd = Etcd(pki=test_pki, data_dir=str(tmp_path / "data"))
    assert etcd.url.startswith("https://") and etcd.peer_url.startswith("https://")
    server = etcd.server_args()
    for flag in ("--client-cert-auth", "--peer-client-cert-auth"):
        assert flag in server
    ca = str(test_pki.dir / pki.CA_CERT)
    assert _option(server, "--trusted-ca-file") == ca
    assert _option(server, "--peer-trusted-ca-file") == ca
    args = etcd.client_args("n1")
    assert _option(args, "--etcd-cert").endswith("/n1.crt")
    assert _option(args, "--etcd-key").endswith("/n1.key")
    assert etcd.tls is not None and etcd.tls.cert == test_pki.dir / f"{ADMIN}.crt"
    assert etcd.operator_env("alice")["HAPAIR_ETCD_CERT"].endswith("/alice.crt")
    assert "HAPAIR_OPERATOR" not in etcd.operator_env("alice")  # the CN names them
    assert etcd.ctl_tls()[0] == f"--cacert={ca}"


def test_the_lab_mode_is_the_member_without_a_pki(tmp_path: Path) -> None:
    etcd = Etcd(data_dir=str(tmp_path / "data"))
    assert etcd.url.startswith("http://") and etcd.tls is None
    assert etcd.server_args() == [] and etcd.ctl_tls() == []
    assert etcd.client_args("n1") == ["--etcd", etcd.url]


def test_a_three_member_etcd_gives_clients_every_member_and_their_own_certificate(
    test_pki: TestPki,
) -> None:
    members = EtcdCluster(pki=test_pki)
    try:
        assert all(m.url.startswith("https://") for m in members.members)
        peers = _option(members.members[0].server_args(), "--peer-cert-file")
        assert peers.endswith("/etcd-1.crt")
        args = members.client_args("a")
        assert _option(args, "--etcd") == members.url and members.url.count("https://") == 3
        assert _option(args, "--etcd-cert").endswith("/a.crt")
    finally:
        members.cleanup()


def test_a_relay_reads_frames_only_of_a_tls_it_ends(test_pki: TestPki, tmp_path: Path) -> None:
    etcd = TlsEtcd(test_pki.dir, ADMIN, data_dir=str(tmp_path / "data"))
    passing = EtcdRelay(etcd.url)
    assert passing.url.startswith("https://")
    with pytest.raises(AssertionError, match="cannot see etcd keys"):
        passing.hold_after(b"/hapair/v1/leader/p", 1.0)
    reading = reading_relay(etcd)
    reading.hold_after(b"/hapair/v1/leader/p", 1.0)
    reading.cut_at(b"/hapair/v1/members/p")
    # Its certificate serves at its address and is a client of etcd too.
    issued = pki.load_certificate(test_pki.dir / "etcd-relay.crt")
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
