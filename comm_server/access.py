"""Who may read and who may write through the comm server's OPC UA server.

Users live in a local file on each node (``--opcua-users``), never in etcd, refused when
anyone but its owner may read it; each has a role, ``reader`` or ``writer``, and a
password hash (scrypt), or none when the user is known by a client certificate only:
one the site CA (``--opcua-ca``) issued, whose common name is the user's name.

    users:
      scada:   {role: writer, password: "scrypt$16384$8$1$<salt>$<hash>"}
      historian: {role: reader}          # by its certificate, CN historian

``hapair-comm --hash-password`` prints a hash for a password read from standard input.
Nobody is ever asyncua's administrator: adding or deleting nodes and writing any node
but a tag's value are refused for everyone (space.py), writing a tag for all but a
writer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncua.crypto.permission_rules import User as _User
from asyncua.crypto.permission_rules import UserRole
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import Field, ValidationError, field_validator

from hapair.shared.log import EventLog
from hapair.shared.model import StrictModel
from hapair.shared.opcua_security import application_uri, untrusted
from hapair.shared.pki import (
    PkiError,
    check_private,
    common_name,
    load_certificate,
    load_private_key,
)
from hapair.shared.topology import OpcUaSecurity
from hapair.shared.validation import format_errors, parse_yaml, read_file

# scrypt's cost: ~35-70 ms and 16 MiB per check here, paid once per session activation,
# in the event loop (asyncua activates a session synchronously): a stall of the pollers
# as long. So checks are rationed (CHECKS_PER_S, a burst of CHECKS_BURST); a login
# beyond them is refused unchecked, and a flood of wrong passwords cannot stall polling.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_LEN = 32
CHECKS_PER_S, CHECKS_BURST = 2.0, 4.0


class AccessError(ValueError):
    """The users file cannot be used; ``problems`` say why."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"not a scrypt hash ({scheme})")
    return int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest)


def check_password(stored: str, password: str) -> bool:
    n, r, p, salt, digest = _parse_hash(stored)
    given = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=len(digest)
    )
    return hmac.compare_digest(given, digest)


class UserEntry(StrictModel):
    role: Literal["reader", "writer"]
    password: str | None = Field(None, description="a scrypt hash (hapair-comm --hash-password)")

    @field_validator("password")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _parse_hash(value)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"not a password hash from hapair-comm --hash-password ({err})"
                ) from None
        return value


class UsersFile(StrictModel):
    users: dict[str, UserEntry] = Field(default_factory=dict)


def load_users(path: Path | str) -> UsersFile:
    path = Path(path)
    try:
        check_private(path)
    except PkiError as err:
        raise AccessError("--opcua-users", [str(err)]) from None
    data = parse_yaml(read_file(path, AccessError), str(path), AccessError)
    try:
        return UsersFile.model_validate(data or {})
    except ValidationError as err:
        raise AccessError(str(path), format_errors(err)) from None


@dataclass
class CommUser(_User):
    """asyncua's user (always its plain User role: never administrator), with ours."""

    writer: bool = False


@dataclass(frozen=True)
class Access:
    """Who the OPC UA server lets in: the users, the CA whose client certificates name
    them, and what a client without a user may do (None: nothing)."""

    users: UsersFile
    ca: x509.Certificate | None = None
    anonymous: Literal["read", "write"] | None = None
    # Sessions only over a signed channel. asyncua lets any client open a NoSecurity
    # channel to ask for the endpoints, and then create a session on it too.
    signed_channel: bool = True

    def may_write(self, user: Any) -> bool:
        return isinstance(user, CommUser) and user.writer


class UserManager:
    """asyncua's user manager over :class:`Access`: a session is activated with the
    user it returns, or refused (BadUserAccessDenied) when it returns None."""

    def __init__(
        self, access: Access, log: EventLog, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.access = access
        self.log = log
        self.clock = clock
        self._tokens = CHECKS_BURST
        self._filled = clock()
        self._throttled = 0  # logins refused unchecked since the last warning
        self._warned = -math.inf

    def _may_check(self) -> bool:
        """Whether a password check fits the ration now (a token bucket)."""
        now = self.clock()
        self._tokens = min(CHECKS_BURST, self._tokens + (now - self._filled) * CHECKS_PER_S)
        self._filled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._throttled += 1
        if now - self._warned >= 10.0:
            self.log.warning("opcua logins throttled", refused=self._throttled)
            self._warned, self._throttled = now, 0
        return False

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> CommUser | None:
        # ``certificate`` is the user's (an X509 token) or the channel's: a signed
        # channel always has one; none means NoSecurity.
        if self.access.signed_channel and certificate is None:
            self.log.warning("opcua session refused", user=username, reason="no secure channel")
            return None
        trusted = self._trusted(certificate)
        if self.access.ca is not None and certificate is not None and trusted is None:
            # asyncua checks the certificate a client names when it creates its
            # session, not that it is the one its channel was opened with: this one is.
            self.log.warning("opcua session refused", user=username, reason="certificate untrusted")
            return None
        if username is not None:
            return self._by_password(username, password or "")
        if trusted is not None:
            entry = self.access.users.users.get(common_name(trusted))
            if entry is not None:
                return self._user(common_name(trusted), entry)
        if self.access.anonymous is None:
            self.log.info("opcua session refused", reason="no user given")
            return None
        return CommUser(role=UserRole.User, name=None, writer=self.access.anonymous == "write")

    def _user(self, name: str, entry: UserEntry) -> CommUser:
        return CommUser(role=UserRole.User, name=name, writer=entry.role == "writer")

    def _by_password(self, name: str, password: str) -> CommUser | None:
        if not self._may_check():
            return None
        entry = self.access.users.users.get(name)
        if entry is None or entry.password is None or not check_password(entry.password, password):
            # The same answer for an unknown user and a wrong password.
            self.log.warning("opcua session refused", user=name, reason="wrong user or password")
            return None
        return self._user(name, entry)

    def _trusted(self, der: bytes | None) -> x509.Certificate | None:
        """The client's certificate (the user's or its channel's), when the site CA
        issued it for clients and it is valid now; else None."""
        if self.access.ca is None or der is None:
            return None
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        if untrusted(certificate, self.access.ca, ExtendedKeyUsageOID.CLIENT_AUTH) is not None:
            return None
        return certificate


@dataclass(frozen=True)
class ServerSecurity:
    """The OPC UA server's endpoints and users: its certificate and key (None: the
    lab's NoSecurity) and who may come in."""

    access: Access
    certificate: Path | None = None
    key: Path | None = None
    uri: str | None = None  # the application URI its certificate names
    # The comm server's certificate and key as a client of its PLCs' OPC UA servers.
    identity: tuple[Path, Path] | None = None

    @classmethod
    def lab(cls, identity: tuple[Path, Path] | None = None) -> ServerSecurity:
        """NoSecurity: anyone may read and write (``opcua: {security: none}``)."""
        return cls(Access(UsersFile(), anonymous="write", signed_channel=False), identity=identity)


def server_security(
    settings: OpcUaSecurity,
    certificate: Path | str | None,
    key: Path | str | None,
    ca: Path | str | None,
    users: Path | str | None,
) -> ServerSecurity:
    """The server's security from the pair's ``opcua:`` and the node's files;
    AccessError naming what is missing or wrong."""
    if settings.security == "none":
        return ServerSecurity.lab((Path(certificate), Path(key)) if certificate and key else None)
    missing = [
        flag
        for flag, given in (
            ("--opcua-cert", certificate),
            ("--opcua-key", key),
            ("--opcua-users", users),
        )
        if not given
    ]
    if missing:
        raise AccessError(
            "OPC UA security is on",
            [
                f"{', '.join(missing)} missing: the server's certificate and key "
                "(hapair pki issue DIR comm NAME) and its users file; or "
                "opcua: {security: none} for the pair in the site file (labs only)"
            ],
        )
    assert certificate is not None and key is not None and users is not None
    try:
        own = load_certificate(Path(certificate))
        if not isinstance(load_private_key(Path(key)), rsa.RSAPrivateKey):
            raise PkiError(f"{key}: OPC UA needs an RSA key (hapair pki issue DIR comm NAME)")
        trusted = load_certificate(Path(ca)) if ca else None
    except PkiError as err:
        raise AccessError("OPC UA security", [str(err)]) from None
    uri = application_uri(own)
    if uri is None:
        raise AccessError(
            str(certificate), ["names no application URI (a URI in its subjectAltName)"]
        )
    anonymous: Literal["read"] | None = "read" if settings.anonymous == "read" else None
    access = Access(load_users(users), trusted, anonymous)
    identity = (Path(certificate), Path(key))
    return ServerSecurity(access, identity[0], identity[1], uri, identity)
