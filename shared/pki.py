"""A site's certificates and peer keys (``hapair pki``), and TLS contexts built from them.

A small certificate authority for sites without a PKI of their own, in one directory:
``ca.crt``/``ca.key`` (the site CA, ECDSA P-256), ``NAME.crt``/``NAME.key`` for each
component, ``peer-PAIR.key`` for each pair's peer path. A certificate's common name is
the identity its holder shows (etcd with ``--client-cert-auth`` and auth on takes the CN
as the user). A site with its own PKI uses its own files: everything that reads them
takes paths.

Private keys are written 0600 and read only when no one but their owner, the user
reading them, can read or change them (:func:`check_private`).
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import os
import re
import secrets
import ssl
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from hapair.shared.lazy import LazyModule

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509 import oid

    PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
else:
    # Loaded when a certificate is made or read: the agent does neither (its own etcd
    # certificate is checked by OpenSSL, etcd_tls.py), and saves about 9 MiB.
    x509 = LazyModule("cryptography.x509")
    hashes = LazyModule("cryptography.hazmat.primitives.hashes")
    serialization = LazyModule("cryptography.hazmat.primitives.serialization")
    ec = LazyModule("cryptography.hazmat.primitives.asymmetric.ec")
    rsa = LazyModule("cryptography.hazmat.primitives.asymmetric.rsa")
    oid = LazyModule("cryptography.x509.oid")

from hapair.shared.topology import NAME_PATTERN

CA_YEARS = 20
LEAF_YEARS = 3
# Valid from a little before now: a server whose clock lags the one that issued the
# certificate would otherwise refuse it as not yet valid.
BACKDATE = datetime.timedelta(hours=1)
PEER_KEY_BYTES = 32
# RSA key sizes for OPC UA: both its policies here take 2048 to 4096 bits; 2048 is the
# default (each handshake signs and decrypts with it), 3072 for sites that ask for it.
RSA_BITS = (2048, 3072)
CA_CERT, CA_KEY = "ca.crt", "ca.key"

# What a certificate's file name may be: it is also its CN, so an etcd user name and a
# name in events; no path separator, no leading dot; 64 is X.509's bound on a CN.
CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


class PkiError(Exception):
    """A request the PKI refuses, or a file it cannot use; the message names which."""


class Exists(PkiError):
    """A file would be overwritten (and ``force`` was not given)."""


class Kind(enum.StrEnum):
    ETCD = "etcd"
    AGENT = "agent"
    REGISTRY = "registry"
    COMM = "comm"
    OPCUA_CLIENT = "opcua-client"
    POSTGRES = "postgres"
    OPERATOR = "operator"
    ADMIN = "admin"
    METRICS = "metrics"
    PROMETHEUS = "prometheus"


@dataclass(frozen=True)
class Profile:
    """What a kind of certificate is for, and so what it carries."""

    purpose: str
    server: bool  # serverAuth, and a name (IP or DNS) clients can check is required
    client: bool  # clientAuth
    # OPC UA's Basic256Sha256 (asyncua's strongest RSA policy) needs an RSA key and an
    # application URI; ECDSA P-256 everywhere else.
    opc_ua: bool = False
    # A client that may still name its host (--ip, --dns): OPC UA application
    # certificates may, though servers do not check a client's.
    names_allowed: bool = False


PROFILES: dict[Kind, Profile] = {
    Kind.ETCD: Profile("an etcd member: its client and peer ports", server=True, client=True),
    Kind.AGENT: Profile("an agent: a client of etcd", server=False, client=True),
    Kind.REGISTRY: Profile(
        "a registry: its HTTPS port, and a client of etcd", server=True, client=True
    ),
    Kind.COMM: Profile(
        "a comm server: its OPC UA server (RSA), and a client of etcd",
        server=True,
        client=True,
        opc_ua=True,
    ),
    Kind.OPCUA_CLIENT: Profile(
        "an OPC UA client application (SCADA, the client library's OPC UA adapter): RSA, "
        "not a client of etcd",
        server=False,
        client=True,
        opc_ua=True,
        names_allowed=True,
    ),
    # Server only: the agents and replication authenticate to it with passwords (scram),
    # and check its name against the address they connect to.
    Kind.POSTGRES: Profile(
        "a node's PostgreSQL server: its port, for replication, the agents and clients",
        server=True,
        client=False,
    ),
    Kind.OPERATOR: Profile("an operator: the hapair command line", server=False, client=True),
    Kind.ADMIN: Profile(
        "an administrator: applies the topology and the etcd roles", server=False, client=True
    ),
    Kind.METRICS: Profile(
        "a daemon's metrics port (--metrics-listen), scraped over HTTPS",
        server=True,
        client=False,
    ),
    Kind.PROMETHEUS: Profile(
        "a Prometheus server: the client certificate it scrapes metrics ports with",
        server=False,
        client=True,
    ),
}


@dataclass(frozen=True)
class Issued:
    """A certificate written to ``cert`` with its private key in ``key``."""

    cert: Path
    key: Path
    certificate: x509.Certificate


# ---- files ------------------------------------------------------------------------


def check_private(path: Path) -> None:
    """Refuse a secret file that anyone but its owner, the user reading it, may use.

    As libpq does for ``.pgpass``: a key readable by another user may already be
    someone else's."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    if st.st_uid != os.geteuid():
        raise PkiError(
            f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): "
            f"give it to this user (chown) or run as its owner"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(
            f"{path}: group or others have access (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"chmod 600 {path}"
        )


def _ensure_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    elif not directory.is_dir():
        raise PkiError(f"{directory}: not a directory")


def _exists(path: Path, why: str = "--force to replace it") -> Exists:
    return Exists(f"{path} exists: nothing was written ({why})")


def _refuse_existing(paths: Iterable[Path], why: str = "--force to replace it") -> None:
    for path in paths:
        if path.exists():
            raise _exists(path, why)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` with ``mode`` from the file's first byte (the umask aside).

    Without ``force`` an existing file is refused; with it, the file is replaced whole
    or not at all, so that a reader never sees half a key."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise _exists(path) from None
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        target.unlink()
        raise
    os.close(fd)
    if force:
        os.replace(target, path)


def _name(name: str, what: str) -> str:
    if not name:
        raise PkiError(f"{what}: an empty name")
    if "/" in name or "\\" in name or "\0" in name:
        raise PkiError(f"{what} {name!r}: a path separator is not allowed in a name")
    if not CERT_NAME.match(name):
        raise PkiError(
            f"{what} {name!r}: use letters, digits and . _ @ - (first a letter or digit), "
            "at most 64 characters"
        )
    return name


def _pair(pair: str) -> str:
    if "/" in pair or "\\" in pair:
        raise PkiError(f"pair {pair!r}: a path separator is not allowed in a name")
    if not re.match(NAME_PATTERN, pair):
        raise PkiError(f"pair {pair!r}: not a pair name of the site file ({NAME_PATTERN})")
    return pair


# ---- reading ----------------------------------------------------------------------


def load_certificate(path: Path) -> x509.Certificate:
    return read_certificate(path)[0]


def read_certificate(path: Path) -> tuple[x509.Certificate, bytes]:
    """The file's first certificate, and the file's bytes (the whole chain it holds)."""
    try:
        data = path.read_bytes()
        return x509.load_pem_x509_certificate(data), data
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    except ValueError as err:
        raise PkiError(f"{path}: not a PEM certificate ({err})") from None


def load_private_key(path: Path) -> PrivateKey:
    check_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: a {type(key).__name__}, not an ECDSA or RSA key")
    return key


@dataclass(frozen=True)
class Ca:
    certificate: x509.Certificate
    key: PrivateKey

    @property
    def site(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(oid.NameOID.ORGANIZATION_NAME)
        return str(names[0].value) if names else ""


def load_ca(directory: Path) -> Ca:
    """The site CA in ``directory``; refused if its key is not its certificate's."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.exists():
        raise PkiError(f"{cert_path}: no site CA here (hapair pki init {directory} --site NAME)")
    ca = Ca(load_certificate(cert_path), load_private_key(key_path))
    if ca.key.public_key() != ca.certificate.public_key():
        raise PkiError(f"{key_path}: not the key of {cert_path}")
    return ca


def common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(oid.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


# ---- writing ----------------------------------------------------------------------


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _years(now: datetime.datetime, years: int) -> datetime.datetime:
    return now + datetime.timedelta(days=365 * years + years // 4)


def init(directory: Path | str, site: str, *, now: datetime.datetime | None = None) -> Issued:
    """Create the site CA in ``directory`` (made 0700 if missing); never replaces one."""
    directory = Path(directory)
    site = site.strip()
    if not site or len(site) > 64 or any(not c.isprintable() for c in site):
        raise PkiError(f"site {site!r}: give a printable name of 1 to 64 characters")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _ensure_dir(directory)
    # Replacing it would orphan every certificate it signed.
    _refuse_existing((cert_path, key_path), "a site CA is never replaced")
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(oid.NameOID.ORGANIZATION_NAME, site),
            x509.NameAttribute(oid.NameOID.COMMON_NAME, f"hapair CA {site}"[:64]),  # X.509's bound
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(_years(now, CA_YEARS))
        # It signs the site's certificates and nothing else: no intermediate CA below it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), 0o600, force=False)
    _write(cert_path, _pem_cert(certificate), 0o644, force=False)
    return Issued(cert_path, key_path, certificate)


def _key_usage(
    *, cert_sign: bool = False, signature: bool = False, encipherment: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        # OPC UA application certificates carry all four (asyncua checks them).
        content_commitment=encipherment,
        key_encipherment=encipherment,
        data_encipherment=encipherment,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _addresses(ips: Iterable[str], dns: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for ip in ips:
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            raise PkiError(f"--ip {ip!r}: not an IPv4 or IPv6 address") from None
        names.append(x509.IPAddress(address))
    for host in dns:
        host = host.strip().rstrip(".")
        if len(host) > 253 or not all(DNS_LABEL.match(label) for label in host.split(".")):
            raise PkiError(f"--dns {host!r}: not a host name (letters, digits, - and dots)")
        names.append(x509.DNSName(host.lower()))
    return list(dict.fromkeys(names))  # each once, in the order given


def issue(
    directory: Path | str,
    kind: Kind | str,
    name: str,
    ips: Sequence[str] = (),
    dns: Sequence[str] = (),
    *,
    uri: str | None = None,
    rsa_bits: int | None = None,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> Issued:
    """Issue ``NAME.crt``/``NAME.key`` in ``directory``, signed by its site CA.

    ``ips``/``dns`` are the names clients check the server by (required for the kinds
    that serve); ``uri`` is an OPC UA application's URI (default
    ``urn:hapair:KIND:NAME``): the application must announce the same one; ``rsa_bits``
    the size of an OPC UA certificate's RSA key (:data:`RSA_BITS`, default 2048)."""
    directory = Path(directory)
    try:
        kind = Kind(kind)
    except ValueError:
        raise PkiError(f"kind {kind!r}: not one of {', '.join(k.value for k in Kind)}") from None
    profile = PROFILES[kind]
    _name(name, "name")
    if name == "ca" or name.startswith("peer-"):
        raise PkiError(f"name {name!r}: kept for the CA's and the peer keys' files")
    addresses = _addresses(ips, dns)
    if profile.server and not addresses:
        raise PkiError(f"{kind} certificate {name!r}: give its address (--ip or --dns)")
    if not (profile.server or profile.names_allowed) and addresses:
        raise PkiError(f"{kind} certificate {name!r}: a client's certificate has no --ip or --dns")
    opc_ua_kinds = ", ".join(k.value for k, p in PROFILES.items() if p.opc_ua)
    if uri is not None and not profile.opc_ua:
        raise PkiError(f"{kind} certificate {name!r}: --uri is for OPC UA kinds ({opc_ua_kinds})")
    if rsa_bits is not None and not profile.opc_ua:
        raise PkiError(
            f"{kind} certificate {name!r}: --rsa-bits is for OPC UA kinds ({opc_ua_kinds}); "
            "the others are ECDSA P-256"
        )
    if rsa_bits is not None and rsa_bits not in RSA_BITS:
        raise PkiError(f"--rsa-bits {rsa_bits}: {' or '.join(map(str, RSA_BITS))}")
    if profile.opc_ua:
        uri = uri or f"urn:hapair:{kind.value}:{name}"
        if not URI.match(uri):
            raise PkiError(f"--uri {uri!r}: not a URI (urn:...)")
        addresses.insert(0, x509.UniformResourceIdentifier(uri))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    ca = load_ca(directory)
    if not force:
        _refuse_existing((cert_path, key_path))

    now = now or datetime.datetime.now(datetime.UTC)
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits or RSA_BITS[0])
        if profile.opc_ua
        else ec.generate_private_key(ec.SECP256R1())
    )
    usages = [oid.ExtendedKeyUsageOID.SERVER_AUTH] if profile.server else []
    usages += [oid.ExtendedKeyUsageOID.CLIENT_AUTH] if profile.client else []
    subject = [x509.NameAttribute(oid.NameOID.COMMON_NAME, name)]
    if ca.site:
        subject.insert(0, x509.NameAttribute(oid.NameOID.ORGANIZATION_NAME, ca.site))
    subject.insert(-1, x509.NameAttribute(oid.NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value))
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # Never past the CA's own end: a chain is no longer valid than its root.
        .not_valid_after(min(_years(now, LEAF_YEARS), ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True, encipherment=profile.opc_ua), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )
    if addresses:
        builder = builder.add_extension(x509.SubjectAlternativeName(addresses), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    _write(key_path, _pem_key(key), 0o600, force)
    _write(cert_path, _pem_cert(certificate), 0o644, force)
    return Issued(cert_path, key_path, certificate)


# ---- peer keys --------------------------------------------------------------------


def peer_key(directory: Path | str, pair: str, *, force: bool = False) -> Path:
    """A new random key for ``pair``'s peer path in ``peer-PAIR.key`` (hex, 0600).

    Both nodes of the pair need the same file: copy it, do not run this twice."""
    directory = Path(directory)
    path = directory / f"peer-{_pair(pair)}.key"
    _ensure_dir(directory)
    _write(path, secrets.token_hex(PEER_KEY_BYTES).encode() + b"\n", 0o600, force)
    return path


def load_peer_key(path: Path | str) -> bytes:
    """The key in a peer key file, refused if others may read it or it is malformed."""
    path = Path(path)
    check_private(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != PEER_KEY_BYTES:
        raise PkiError(
            f"{path}: not a peer key ({PEER_KEY_BYTES * 2} hex digits; "
            "hapair pki peer-key DIR PAIR makes one)"
        )
    return key


# ---- TLS --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The CA to trust and this end's certificate and key, for ``ssl`` contexts."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def issued(cls, directory: Path | str, name: str) -> TlsFiles:
        """The files ``hapair pki`` wrote for ``name`` in ``directory``."""
        directory = Path(directory)
        return cls(directory / CA_CERT, directory / f"{name}.crt", directory / f"{name}.key")

    def _load(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as err:
            raise PkiError(f"{self.ca}: cannot be read as a CA certificate ({err})") from None
        if self.cert is not None:
            if self.key is None:
                raise PkiError(f"{self.cert}: a certificate without its key")
            check_private(self.key)
            try:
                context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as err:
                raise PkiError(
                    f"{self.cert}, {self.key}: not a certificate and its key ({err})"
                ) from None
        return context

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """A server's context: TLS 1.2+, clients verified against the CA (required
        unless ``require_client_cert`` is False, then checked when shown)."""
        if self.cert is None:
            raise PkiError(f"{self.ca}: a server needs its own certificate and key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return self._load(context)

    def client_context(self) -> ssl.SSLContext:
        """A client's context: TLS 1.2+, the server verified against the CA and its name
        (the host connected to) checked; this end's certificate shown when given."""
        return self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def peer_common_name(connection: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The CN of the verified certificate the other end showed, None if it showed none."""
    der = connection.getpeercert(binary_form=True)
    if not der:
        return None
    return common_name(x509.load_der_x509_certificate(der))
