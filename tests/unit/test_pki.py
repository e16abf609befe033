"""``hapair pki``: what each kind of certificate carries, that it chains to the site CA
(checked with cryptography's path validation), the files' modes, and every refusal."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from hapair.registry.console import cli
from hapair.shared import pki

SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init(directory, "Plant A")
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


T = TypeVar("T", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


def ca_of(directory: Path) -> x509.Certificate:
    return pki.load_certificate(directory / "ca.crt")


def verifying(ca: x509.Certificate) -> PolicyBuilder:
    """RFC 5280 path validation against ``ca`` with the Web PKI's rules, but for one: a
    client's certificate may have no subject alternative name (its identity is its CN,
    as etcd and OpenSSL read it)."""
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    return (
        PolicyBuilder()
        .store(Store([ca]))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
    )


def years(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365.25


# ---- the CA -----------------------------------------------------------------------


def test_init_makes_a_long_lived_p256_ca_naming_the_site_with_its_key_0600(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "new" / "pki"
    issued = pki.init(directory, "Plant A")
    assert (issued.cert, issued.key) == (directory / "ca.crt", directory / "ca.key")
    cert = ca_of(directory)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Plant A"
    assert "Plant A" in pki.common_name(cert)
    assert cert.issuer == cert.subject
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert years(cert) >= 19
    assert (mode(directory), mode(directory / "ca.key"), mode(directory / "ca.crt")) == (
        0o700,
        0o600,
        0o644,
    )


def test_init_never_replaces_a_ca(site: Path) -> None:
    before = (site / "ca.crt").read_bytes(), (site / "ca.key").read_bytes()
    with pytest.raises(pki.Exists, match=r"ca\.crt exists.*never replaced"):
        pki.init(site, "Plant A")
    (site / "ca.crt").unlink()  # a key alone is still a CA's: refused as well
    with pytest.raises(pki.Exists, match=r"ca\.key exists"):
        pki.init(site, "Plant A")
    assert (site / "ca.key").read_bytes() == before[1]


def test_a_site_name_is_required(tmp_path: Path) -> None:
    for bad in ("  ", "x" * 65, "plant\nA"):
        with pytest.raises(pki.PkiError, match=r"site .*: give a printable name"):
            pki.init(tmp_path, bad)
    assert not (tmp_path / "ca.key").exists()


# ---- each kind --------------------------------------------------------------------

# kind, addresses given, extended key usages, RSA (OPC UA) or ECDSA P-256
KINDS = [
    ("etcd", {"ips": ["127.0.0.1", "::1"], "dns": ["etcd-1.plant"]}, {SERVER, CLIENT}, False),
    ("registry", {"dns": ["registry.plant"]}, {SERVER, CLIENT}, False),
    ("comm", {"ips": ["10.0.0.5"]}, {SERVER, CLIENT}, True),
    ("opcua-client", {}, {CLIENT}, True),
    ("postgres", {"ips": ["10.0.0.7"], "dns": ["srv-a1.plant"]}, {SERVER}, False),
    ("agent", {}, {CLIENT}, False),
    ("operator", {}, {CLIENT}, False),
    ("admin", {}, {CLIENT}, False),
]


@pytest.mark.parametrize(("kind", "names", "usages", "is_rsa"), KINDS, ids=[k[0] for k in KINDS])
def test_each_kind_carries_its_identity_usages_and_key(
    site: Path,
    kind: str,
    names: dict[str, list[str]],
    usages: set[x509.ObjectIdentifier],
    is_rsa: bool,
) -> None:
    issued = pki.issue(site, kind, f"{kind}-1", names.get("ips", []), names.get("dns", []))
    assert (issued.cert, issued.key) == (site / f"{kind}-1.crt", site / f"{kind}-1.key")
    cert = pki.load_certificate(issued.cert)
    assert cert == issued.certificate
    ca = ca_of(site)
    assert pki.common_name(cert) == f"{kind}-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == kind
    assert cert.issuer == ca.subject
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == usages
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    # OPC UA application certificates carry the four usages asyncua checks.
    assert (
        ku.value.content_commitment and ku.value.key_encipherment and ku.value.data_encipherment
    ) == is_rsa
    key = cert.public_key()
    if is_rsa:
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert (
        ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(ca, x509.SubjectKeyIdentifier).value.digest
    )
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        key
    )
    assert 2 <= years(cert) <= 5
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)
    assert (mode(issued.key), mode(issued.cert)) == (0o600, 0o644)
    assert pki.load_private_key(issued.key).public_key() == key

    ips = [ipaddress.ip_address(a) for a in names.get("ips", [])]
    if SERVER in usages or is_rsa:
        sans = ext(cert, x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.IPAddress) == ips
        assert sans.get_values_for_type(x509.DNSName) == names.get("dns", [])
        # An OPC UA application's certificate names its application URI.
        uris = [f"urn:hapair:{kind}:{kind}-1"] if is_rsa else []
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == uris
    else:
        with pytest.raises(x509.ExtensionNotFound):
            ext(cert, x509.SubjectAlternativeName)

    # The chain verifies against the CA: as a client's for the kinds that are clients,
    # and as a server's by each of its names for the kinds that serve.
    if CLIENT in usages:
        verified = verifying(ca).build_client_verifier().verify(cert, [])
        assert verified.chain == [cert, ca]
    else:
        with pytest.raises(VerificationError):
            verifying(ca).build_client_verifier().verify(cert, [])
    server = PolicyBuilder().store(Store([ca]))
    subjects: list[x509.verification.Subject] = [x509.IPAddress(a) for a in ips]
    subjects += [x509.DNSName(d) for d in names.get("dns", [])]
    for subject in subjects:
        assert server.build_server_verifier(subject).verify(cert, []) == [cert, ca]


def test_serials_are_random_and_another_ca_does_not_verify(site: Path, tmp_path: Path) -> None:
    a = pki.issue(site, "agent", "n1").certificate
    b = pki.issue(site, "agent", "n2").certificate
    assert a.serial_number != b.serial_number and a.serial_number.bit_length() > 64
    other = tmp_path / "other"
    pki.init(other, "Plant A")  # the same site name, another key
    with pytest.raises(VerificationError):
        verifying(ca_of(other)).build_client_verifier().verify(a, [])


async def asyncua_refusal(cert: x509.Certificate, uri: str, as_server: bool) -> int | None:
    """What asyncua's own checks of a peer's certificate (usages, URI, validity) say
    of ``cert`` shown by the application ``uri``, a server's or a client's: None when
    they take it, else the status code."""
    options = CertificateValidatorOptions.EXT_VALIDATION
    options |= (
        CertificateValidatorOptions.PEER_SERVER
        if as_server
        else CertificateValidatorOptions.PEER_CLIENT
    )
    peer = ua.ApplicationDescription()
    peer.ApplicationUri = uri
    peer.ApplicationType = ua.ApplicationType.Server if as_server else ua.ApplicationType.Client
    try:
        await CertificateValidator(options).validate(cert, peer)
    except ServiceError as err:
        return int(err.code)
    return None


async def test_a_comm_certificate_is_what_asyncua_checks_for_an_opc_ua_server(site: Path) -> None:
    cert = pki.issue(site, "comm", "comm-1", ["10.0.0.5"]).certificate
    custom = pki.issue(site, "comm", "comm-2", dns=["comm2"], uri="urn:hapair:comm:line1:n2")
    uris = ext(custom.certificate, x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:hapair:comm:line1:n2"]

    assert await asyncua_refusal(cert, "urn:hapair:comm:comm-1", as_server=True) is None
    other = await asyncua_refusal(cert, "urn:hapair:comm:other", as_server=True)
    assert other == StatusCodes.BadCertificateUriInvalid
    # An ECDSA certificate lacks what OPC UA's RSA policies need.
    etcd = pki.issue(site, "etcd", "e1", ["10.0.0.5"]).certificate
    refused = await asyncua_refusal(etcd, "urn:hapair:comm:comm-1", as_server=True)
    assert refused == StatusCodes.BadCertificateUriInvalid


async def test_an_opcua_client_certificate_is_what_asyncua_checks_for_an_opc_ua_client(
    site: Path,
) -> None:
    """RSA (2048, or 3072 when asked), client use only, its application URI in the SAN
    (``--uri`` for a SCADA client's own), its host's name when given."""
    scada = pki.issue(site, "opcua-client", "scada", dns=["scada-1.plant"], rsa_bits=3072)
    own = pki.issue(site, "opcua-client", "hmi", uri="urn:vendor:hmi:line1").certificate
    key = scada.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert set(ext(scada.certificate, x509.ExtendedKeyUsage).value) == {CLIENT}
    sans = ext(own, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:vendor:hmi:line1"]

    uri = "urn:hapair:opcua-client:scada"
    assert await asyncua_refusal(scada.certificate, uri, as_server=False) is None
    assert await asyncua_refusal(own, "urn:vendor:hmi:line1", as_server=False) is None
    # Not a server's: an OPC UA client checking its server refuses it.
    as_server = await asyncua_refusal(scada.certificate, uri, as_server=True)
    assert as_server == StatusCodes.BadCertificateUseNotAllowed


# ---- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "extra", "message"),
    [
        ("server", "x", {}, "kind 'server': not one of etcd, agent"),
        ("etcd", "e1", {"ips": ["10.0.0.300"]}, "--ip '10.0.0.300': not an IPv4 or IPv6"),
        ("etcd", "e1", {"ips": ["etcd-1"]}, "--ip 'etcd-1'"),
        ("etcd", "e1", {"dns": ["bad_host!"]}, "--dns 'bad_host!': not a host name"),
        ("etcd", "e1", {}, "etcd certificate 'e1': give its address"),
        ("registry", "r1", {}, "give its address"),
        ("postgres", "postgres@a", {}, "postgres certificate 'postgres@a': give its address"),
        ("agent", "n1", {"ips": ["10.0.0.1"]}, "a client's certificate has no --ip"),
        ("admin", "", {}, "name: an empty name"),
        ("admin", "../root", {}, "'../root': a path separator"),
        ("admin", "a/b", {}, "a path separator"),
        ("admin", "a\\b", {}, "a path separator"),
        ("admin", ".hidden", {}, "name '.hidden': use letters"),
        ("admin", "x" * 65, {}, "at most 64"),
        ("admin", "ca", {}, "kept for the CA"),
        ("agent", "peer-line1", {}, "kept for the CA's and the peer keys'"),
        ("etcd", "e1", {"ips": ["10.0.0.1"], "uri": "urn:x"}, "--uri is for OPC UA kinds"),
        ("agent", "n1", {"uri": "urn:x"}, "--uri is for OPC UA kinds (comm, opcua-client)"),
        ("agent", "n1", {"rsa_bits": 3072}, "--rsa-bits is for OPC UA kinds"),
        ("opcua-client", "s1", {"rsa_bits": 1024}, "--rsa-bits 1024: 2048 or 3072"),
        ("opcua-client", "s1", {"uri": "no uri"}, "--uri 'no uri': not a URI"),
        ("comm", "c1", {"ips": ["10.0.0.1"], "uri": "no uri"}, "--uri 'no uri': not a URI"),
    ],
)
def test_bad_requests_are_refused_by_what_is_wrong_and_write_nothing(
    site: Path, kind: str, name: str, extra: dict[str, object], message: str
) -> None:
    before = sorted(p.name for p in site.iterdir())
    with pytest.raises(pki.PkiError, match=re.escape(message)) as err:
        pki.issue(site, kind, name, **extra)  # type: ignore[arg-type]
    assert not isinstance(err.value, pki.Exists)
    assert sorted(p.name for p in site.iterdir()) == before


def test_issuing_never_overwrites_unless_forced(site: Path) -> None:
    first = pki.issue(site, "etcd", "e1", ["10.0.0.1"])
    key = first.key.read_bytes()
    with pytest.raises(pki.Exists, match=r"e1\.crt exists: nothing was written \(--force"):
        pki.issue(site, "etcd", "e1", ["10.0.0.2"])
    assert first.key.read_bytes() == key
    assert pki.load_certificate(first.cert) == first.certificate
    first.cert.unlink()  # a key alone is refused as well
    with pytest.raises(pki.Exists, match=r"e1\.key exists"):
        pki.issue(site, "etcd", "e1", ["10.0.0.2"])

    again = pki.issue(site, "etcd", "e1", ["10.0.0.2"], force=True)
    assert again.key.read_bytes() != key
    assert pki.load_certificate(again.cert) == again.certificate
    assert (mode(again.key), mode(again.cert)) == (0o600, 0o644)
    assert sorted(p.name for p in site.iterdir()) == ["ca.crt", "ca.key", "e1.crt", "e1.key"]


def test_issuing_needs_the_ca_and_its_key_kept_private(site: Path, tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match=r"ca\.crt: no site CA here \(hapair pki init"):
        pki.issue(tmp_path / "empty", "agent", "n1")
    os.chmod(site / "ca.key", 0o640)
    with pytest.raises(pki.PkiError, match=r"ca\.key: group or others have access.*chmod 600"):
        pki.issue(site, "agent", "n1")


# ---- peer keys --------------------------------------------------------------------


def test_a_peer_key_is_32_random_bytes_in_hex_0600(tmp_path: Path) -> None:
    path = pki.peer_key(tmp_path / "keys", "line1")
    assert path == tmp_path / "keys" / "peer-line1.key"
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)
    key = pki.load_peer_key(path)
    assert len(key) == 32 and path.read_text().strip() == key.hex()
    assert pki.load_peer_key(pki.peer_key(tmp_path, "line2")) != key
    with pytest.raises(pki.Exists, match=r"peer-line1\.key exists"):
        pki.peer_key(tmp_path / "keys", "line1")
    assert pki.load_peer_key(path) == key
    assert pki.load_peer_key(pki.peer_key(tmp_path / "keys", "line1", force=True)) != key
    for bad in ("", "a/b", "line 1", "-x"):
        with pytest.raises(pki.PkiError, match="pair"):
            pki.peer_key(tmp_path, bad)


def test_a_peer_key_readable_by_others_or_owned_by_another_user_is_refused(
    tmp_path: Path,
) -> None:
    path = pki.peer_key(tmp_path, "line1")
    os.chmod(path, 0o644)
    with pytest.raises(pki.PkiError) as err:
        pki.load_peer_key(path)
    assert str(err.value) == (f"{path}: group or others have access (mode 0644): chmod 600 {path}")
    os.chmod(path, 0o600)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 65534, 65534)
        with pytest.raises(pki.PkiError, match=r"owned by uid 65534, not by this user"):
            pki.load_peer_key(path)


def test_a_malformed_peer_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer-line1.key"
    for text in ("", "zz" * 32, "ab" * 16):
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(pki.PkiError, match="not a peer key"):
            pki.load_peer_key(path)
    with pytest.raises(pki.PkiError, match="no such file"):
        pki.load_peer_key(tmp_path / "missing.key")


# ---- TLS contexts -----------------------------------------------------------------


def test_tls_contexts_verify_the_other_end_with_tls_1_2_at_least(site: Path) -> None:
    pki.issue(site, "etcd", "e1", ["127.0.0.1"])
    pki.issue(site, "admin", "root")
    server = pki.TlsFiles.issued(site, "e1").server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    optional = pki.TlsFiles.issued(site, "e1").server_context(require_client_cert=False)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    client = pki.TlsFiles.issued(site, "root").client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    anonymous = pki.TlsFiles(site / "ca.crt").client_context()
    assert anonymous.check_hostname
    with pytest.raises(pki.PkiError, match="a server needs its own certificate"):
        pki.TlsFiles(site / "ca.crt").server_context()
    os.chmod(site / "root.key", 0o644)
    with pytest.raises(pki.PkiError, match=r"root\.key: group or others have access"):
        pki.TlsFiles.issued(site, "root").client_context()
    with pytest.raises(pki.PkiError, match=r"nope\.crt.*not a certificate and its key"):
        pki.TlsFiles(site / "ca.crt", site / "nope.crt", site / "e1.key").client_context()


# ---- the command line -------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # main() quiets the "hapair" logger for its own process; this one goes on to other
    # tests that capture its records.
    logger = logging.getLogger("hapair")
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        with pytest.raises(SystemExit) as done:
            cli.main(["pki", *argv])
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def test_the_command_line_prints_what_it_wrote_and_one_line_when_it_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "pki")
    assert run(capsys, "init", d, "--site", "Plant A") == (
        0,
        f"wrote {d}/ca.crt\nwrote {d}/ca.key\n",
        "",
    )
    code, out, err = run(capsys, "issue", d, "etcd", "e1", "--ip", "10.0.0.1", "--dns", "e1")
    assert (code, out, err) == (0, f"wrote {d}/e1.crt\nwrote {d}/e1.key\n", "")
    sans = ext(pki.load_certificate(Path(d) / "e1.crt"), x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["e1"]
    code, out, _ = run(capsys, "peer-key", d, "line1")
    assert code == 0 and out.startswith(f"wrote {d}/peer-line1.key\n")

    refusals = [
        (("init", d, "--site", "Plant A"), 1, "ca.crt exists"),
        (("issue", d, "etcd", "e1", "--ip", "10.0.0.1"), 1, "e1.crt exists"),
        (("issue", d, "bogus", "x"), 2, "kind 'bogus'"),
        (("issue", d, "etcd", "e2", "--ip", "nope"), 2, "--ip 'nope'"),
        (("issue", d, "admin", "../x"), 2, "a path separator"),
        (("issue", d, "opcua-client", "s2", "--rsa-bits", "512"), 2, "--rsa-bits 512"),
        (("issue", str(tmp_path), "admin", "a"), 2, "no site CA here"),
        (("peer-key", d, "a/b"), 2, "a path separator"),
    ]
    for argv, expected, message in refusals:
        code, out, err = run(capsys, *argv)
        assert (code, out) == (expected, ""), argv
        assert err.startswith("hapair: ") and message in err and err.count("\n") == 1, err
    # A forced issue replaces the pair of files.
    code, out, _ = run(capsys, "issue", d, "etcd", "e1", "--ip", "10.0.0.2", "--force")
    assert code == 0 and "e1.crt" in out
