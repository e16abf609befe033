"""The PostgreSQL server's certificate, its key and the site CA: checked, then copied
into the node's run dir at every start.

The files live where the site keeps its PKI (``database.tls``; ``hapair pki issue DIR
postgres postgres@NODE --ip ADDRESS``), a directory the database's user may not even
enter. So the agent reads them, as it reads the password files, and writes copies into
the run dir (0700, the database's user's), where the server reads its certificate and
key and where the standby's own connections (walreceiver, ``pg_basebackup``,
``pg_rewind``, all run as that user) find the CA. Being read at every start, a renewed
certificate is served from the next start on.

Every connection to a node's server checks its certificate against the CA and its
name against the address connected to (``sslmode=verify-full``): the certificate must
name the node's address.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapair.shared.validation import expand
from hapair.workshop_agent.pg import files
from hapair.workshop_agent.pg.config import DatabaseConfig, Layout
from hapair.workshop_agent.pg.errors import TlsError
from hapair.workshop_agent.pg.secrets import Secret

FIELD = "database.tls"
MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class TlsSource:
    """This node's TLS files, placeholders expanded."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, config: DatabaseConfig, values: Mapping[str, str]) -> TlsSource | None:
        """Where this node's files are; None in the lab mode (``security: none``)."""
        tls = config.tls_files
        if tls is None:
            return None
        return cls(
            Path(expand(tls.ca_file, values)),
            Path(expand(tls.cert_file, values)),
            Path(expand(tls.key_file, values)),
        )


@dataclass(frozen=True)
class TlsPem:
    """What was read: the server's certificate, its key and the CA, as PEM text."""

    cert: str
    key: Secret
    ca: str


def client_params(ca: Path | None) -> dict[str, str]:
    """libpq's settings for a connection to a node: its certificate checked against
    ``ca`` and its name against the address connected to; none in the lab mode."""
    if ca is None:
        return {}
    return {"sslmode": "verify-full", "sslrootcert": str(ca)}


def _read(path: Path, field: str) -> bytes:
    try:
        raw = path.read_bytes()[: MAX_BYTES + 1]
    except FileNotFoundError:
        raise TlsError(field, path, _missing(field)) from None
    except IsADirectoryError:
        raise TlsError(field, path, "is a directory, not a file") from None
    except OSError as err:
        raise TlsError(field, path, f"cannot read it: {err.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise TlsError(field, path, f"longer than {MAX_BYTES} bytes: not a PEM file")
    return raw


def _missing(field: str) -> str:
    fix = {
        f"{FIELD}.ca_file": "the site CA (hapair pki init DIR --site NAME writes ca.crt)",
        f"{FIELD}.cert_file": "issue it with hapair pki issue DIR postgres postgres@NODE "
        "--ip ADDRESS",
        f"{FIELD}.key_file": "hapair pki issue writes it beside the certificate",
    }[field]
    return (
        f"no such file: {fix}; or name the files in database.tls, or run the pair in the "
        "lab mode without TLS (database: {security: none})"
    )


def _certificate(pem: bytes, field: str, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise TlsError(field, path, f"not a PEM certificate ({err})") from None


def _check_private(path: Path, field: str, db_uid: int) -> None:
    """As PostgreSQL and libpq do for a key: no access for group or others, owned by this
    agent's user or by the database's user (who is to use it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise TlsError(field, path, _missing(field)) from None
    owners = {os.geteuid(), db_uid}
    if st.st_uid not in owners:
        raise TlsError(
            field,
            path,
            f"owned by uid {st.st_uid}, neither this agent's user (uid {os.geteuid()}) nor "
            f"the database's (uid {db_uid}): chown it to one of them",
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsError(
            field,
            path,
            f"group or others have access (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}",
        )


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ips + [d.lower() for d in san.get_values_for_type(x509.DNSName)]


def _names_address(names: list[str], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower().rstrip(".") in names
    return str(ip) in names


def load(source: TlsSource, address: str, db_uid: int) -> TlsPem:
    """Read and check the files: the certificate is the site CA's, a server's, valid now,
    names ``address`` (the standbys and the agent check it), and the key is its own and
    private. TlsError naming the file and the fix otherwise."""
    ca_field, cert_field, key_field = (f"{FIELD}.{f}" for f in ("ca_file", "cert_file", "key_file"))
    ca_pem, cert_pem = _read(source.ca, ca_field), _read(source.cert, cert_field)
    ca, cert = (
        _certificate(ca_pem, ca_field, source.ca),
        _certificate(cert_pem, cert_field, source.cert),
    )
    _check_private(source.key, key_field, db_uid)
    key_pem = _read(source.key, key_field)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise TlsError(
            key_field, source.key, f"not an unencrypted PEM private key ({err})"
        ) from None
    if key.public_key() != cert.public_key():
        raise TlsError(key_field, source.key, f"not the key of {source.cert}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(
            cert_field,
            source.cert,
            f"not issued by the CA of {source.ca}: the standbys would refuse it",
        ) from None
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise TlsError(
            cert_field, source.cert, "not a server's certificate (issue it as the kind postgres)"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsError(
            cert_field,
            source.cert,
            f"valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue it again (--force)",
        )
    names = _names(cert)
    if not _names_address(names, address):
        raise TlsError(
            cert_field,
            source.cert,
            f"does not name {address}, the node's address that the standbys and the agent "
            f"connect to (it names {', '.join(names) or 'no address'}): issue it with "
            f"--ip {address}",
        )
    return TlsPem(cert_pem.decode("ascii"), Secret(key_pem.decode("ascii")), ca_pem.decode("ascii"))


def install(pem: TlsPem, layout: Layout, uid: int, gid: int) -> None:
    """The copies the server and the standby's connections read, the database user's."""
    files.write_file(layout.tls_cert, pem.cert, uid, gid)
    files.write_file(layout.tls_key, pem.key.reveal(), uid, gid)
    files.write_file(layout.tls_ca, pem.ca, uid, gid)
