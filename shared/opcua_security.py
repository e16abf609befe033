"""OPC UA security from the site PKI: which policies, whose certificates are trusted,
and a client's secure channel (the OPC UA client adapter, the comm server's PLC driver).

Certificates for OPC UA carry RSA keys (its policies sign and encrypt with RSA) and the
application's URI in their subjectAltName; ``hapair pki issue DIR comm NAME`` issues
such a certificate for a comm server, ``hapair pki issue DIR opcua-client NAME`` for a
client application. A peer's certificate is trusted when the CA file given issued it and
it is valid now: the comm server checks its clients' this way, a client its server's.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies as _policies
from asyncua.crypto.uacrypto import CertProperties
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapair.shared.pki import PkiError, load_certificate, load_private_key

_ua: Any = __import__("asyncua").ua
policies: Any = _policies

Policy = Literal["Basic256Sha256", "Aes256_Sha256_RsaPss"]
Mode = Literal["Sign", "SignAndEncrypt"]
POLICY_CLASSES: dict[str, Any] = {
    "Basic256Sha256": policies.SecurityPolicyBasic256Sha256,
    "Aes256_Sha256_RsaPss": policies.SecurityPolicyAes256Sha256RsaPss,
}
# What the comm server offers when its security is on: both policies, both modes.
SERVER_POLICIES: list[Any] = [
    _ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    _ua.SecurityPolicyType.Basic256Sha256_Sign,
    _ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
    _ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
]


def application_uri(certificate: x509.Certificate) -> str | None:
    """The OPC UA application URI a certificate names (its first URI in subjectAltName)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def untrusted(
    certificate: x509.Certificate,
    ca: x509.Certificate,
    usage: x509.ObjectIdentifier,
    now: datetime.datetime | None = None,
) -> str | None:
    """Why ``certificate`` is not to be trusted for ``usage`` under ``ca``, or None."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the site CA"
    now = now or datetime.datetime.now(datetime.UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        return "expired or not yet valid"
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None  # no restriction
    if usage not in usages:
        return f"not for {usage._name}"
    return None


def validator(ca: x509.Certificate, usage: x509.ObjectIdentifier) -> Any:
    """An asyncua certificate validator: the peer's certificate must be the CA's."""

    async def validate(certificate: x509.Certificate, _description: Any) -> None:
        if untrusted(certificate, ca, usage) is not None:
            raise ServiceError(_ua.StatusCodes.BadCertificateUntrusted)

    return validate


def pem(path: Path) -> Any:
    """A PEM file for asyncua, whatever its name (it takes all but ``*.pem`` for DER)."""
    return CertProperties(str(path), extension="pem")


@dataclass(frozen=True)
class ClientSecurity:
    """A client's secure channel: its certificate and key, the CA its server's
    certificate must come from, the policy and the mode."""

    certificate: Path
    key: Path
    ca: Path
    policy: Policy = "Basic256Sha256"
    mode: Mode = "SignAndEncrypt"

    def check(self) -> None:
        """PkiError naming what is wrong with the files (read before connecting)."""
        if not isinstance(load_private_key(self.key), rsa.RSAPrivateKey):
            raise PkiError(
                f"{self.key}: OPC UA needs an RSA key (hapair pki issue DIR opcua-client NAME)"
            )
        load_certificate(self.certificate)
        load_certificate(self.ca)

    async def apply(self, client: Any) -> None:
        """Set ``client`` (an asyncua Client, not connected) up for a secure channel."""
        self.check()
        own = load_certificate(self.certificate)
        uri = application_uri(own)
        if uri is not None:  # the server may check that the two agree
            client.application_uri = uri
        client.certificate_validator = validator(
            load_certificate(self.ca), ExtendedKeyUsageOID.SERVER_AUTH
        )
        await client.set_security(
            POLICY_CLASSES[self.policy],
            pem(self.certificate),
            pem(self.key),
            mode=getattr(_ua.MessageSecurityMode, self.mode),
        )
