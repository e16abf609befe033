"""The common name read from a certificate's DER agrees with cryptography's reading."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from hapair.shared import der, pki


def _certificate(subject: x509.Name) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_a_hapair_certificate(tmp_path: Path) -> None:
    pki.init(tmp_path, "site")
    issued = pki.issue(tmp_path, "agent", "asm-a")
    (found,) = der.certificates(issued.cert.read_bytes())
    assert der.common_name(found) == "asm-a" == pki.common_name(issued.certificate)


@settings(max_examples=60, deadline=None)
@given(
    # Up to 64 characters of the Basic Multilingual Plane: cryptography counts a
    # character beyond it as two towards X.509's limit of 64.
    cn=st.text(
        st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",)), min_size=1, max_size=64
    ),
    org=st.text(
        st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",)), min_size=1, max_size=20
    ),
    cn_first=st.booleans(),
)
def test_any_subject(cn: str, org: str, cn_first: bool) -> None:
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
    ]
    subject = x509.Name(attrs if cn_first else attrs[::-1])
    assert der.common_name(_certificate(subject)) == cn


def test_no_common_name() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "plant")])
    assert der.common_name(_certificate(subject)) == ""


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01", b"\x30\x82\xff\xff" + b"\0" * 8])
def test_not_a_certificate(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        der.common_name(garbage)


def test_blocks_in_order_and_other_blocks_ignored(tmp_path: Path) -> None:
    pki.init(tmp_path, "site")
    a = pki.issue(tmp_path, "agent", "a").cert.read_bytes()
    b = pki.issue(tmp_path, "agent", "b").cert.read_bytes()
    key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    names = [der.common_name(d) for d in der.certificates(a + key + b)]
    assert names == ["a", "b"]
