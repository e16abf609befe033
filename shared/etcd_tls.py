"""etcd over TLS: the files a component shows etcd, checked once at start, and the
secure gRPC channel the store opens with them.

aetcd opens only plain channels; the store's member client opens one of these instead
when it is given credentials. ``https://`` endpoints need the CA (never silently plain);
``http://`` endpoints are the lab mode, in clear and unauthenticated, and the daemons
say so at start. Every component takes ``--etcd-ca``, ``--etcd-cert`` and ``--etcd-key``
(env ``HAPAIR_ETCD_CA``, ``HAPAIR_ETCD_CERT``, ``HAPAIR_ETCD_KEY``) from
:func:`add_options`.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import grpc
from pydantic import BaseModel, ValidationInfo, field_validator

from hapair.shared import der, pki
from hapair.shared.log import EventLog
from hapair.shared.pki import TlsFiles

ENV = {"ca": "HAPAIR_ETCD_CA", "cert": "HAPAIR_ETCD_CERT", "key": "HAPAIR_ETCD_KEY"}
OPTION = {"ca": "--etcd-ca", "cert": "--etcd-cert", "key": "--etcd-key"}
Credentials: TypeAlias = grpc.ChannelCredentials  # what the store's connections are opened with


class EtcdTlsError(ValueError):
    """The etcd URLs and TLS files do not make a usable connection; the message names
    the option to fix. A ValueError, as a bad ``--etcd`` is."""


def _given(option: str) -> str:
    return f"{OPTION[option]} (or {ENV[option]})"


def scheme(urls: str | Sequence[str]) -> str:
    """``http`` or ``https``: the one scheme of every endpoint (bare ``HOST:PORT`` is
    ``http``). Mixed schemes are refused: half the members in clear is no TLS."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    schemes = {
        urlsplit(item).scheme if "//" in item else "http"
        for item in (i.strip() for i in items)
        if item
    }
    if len(schemes) > 1:
        raise EtcdTlsError(
            f"etcd endpoints {','.join(i.strip() for i in items)!r} mix http:// and https://: "
            "give every member with the same scheme"
        )
    return schemes.pop() if schemes else "http"


def check(urls: str | Sequence[str], tls: TlsFiles | None) -> bool:
    """Whether the endpoints are to be reached over TLS; refuses ``https://`` without a
    CA and TLS files with ``http://`` endpoints (either would not be what was meant)."""
    secure = scheme(urls) == "https"
    if secure and tls is None:
        raise EtcdTlsError(
            f"etcd endpoints are https:// but no CA is given: give {_given('ca')}, the CA "
            "that signed etcd's certificate (never silently plain)"
        )
    if not secure and tls is not None:
        raise EtcdTlsError(
            f"{_given('ca')} given but the etcd endpoints are http://: use https:// URLs "
            "(or drop the TLS options for the lab mode)"
        )
    return secure


@dataclass(frozen=True)
class Prepared:
    """What a client connects with, from one reading of its files: the channel's
    credentials, and the etcd user its certificate makes of it (its CN; None without one)."""

    credentials: Credentials
    identity: str | None


def credentials(tls: TlsFiles) -> Prepared:
    """gRPC channel credentials from ``tls``, every file read and checked now: the CA
    is a certificate, the key is private to this user and is the certificate's.

    The checks are OpenSSL's (through :mod:`ssl`) and the certificate's CN is read from
    its DER (:mod:`der`): an agent does not load ``cryptography`` for them."""
    ca, _ = _first_certificate(tls.ca)
    chain: bytes | None = None
    key: bytes | None = None
    identity: str | None = None
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        raise EtcdTlsError(f"{_given(missing)} missing: a client certificate needs its key")
    if tls.cert is not None and tls.key is not None:
        # The identity and the chain gRPC shows come from one reading of the file; the
        # key check is OpenSSL's, which reads the two files again (ssl takes only paths).
        first, chain = _first_certificate(tls.cert)
        pki.check_private(tls.key)
        key = _read(tls.key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            # A password callback that gives none: an encrypted key is refused, never
            # asked for on a terminal.
            context.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                raise EtcdTlsError(f"{tls.key}: not the key of {tls.cert}") from None
            raise pki.PkiError(
                f"{tls.key}: not an unencrypted PEM private key ({err.reason or err})"
            ) from None
        try:
            identity = der.common_name(first) or None
        except ValueError as err:
            raise pki.PkiError(f"{tls.cert}: not a PEM certificate ({err})") from None
    creds = grpc.ssl_channel_credentials(
        root_certificates=ssl.DER_cert_to_PEM_cert(ca).encode(),
        private_key=key,
        certificate_chain=chain,
    )
    return Prepared(creds, identity)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise pki.PkiError(f"{path}: no such file") from None
    except OSError as err:
        raise pki.PkiError(f"{path}: {err.strerror or err}") from None


def _first_certificate(path: Path) -> tuple[bytes, bytes]:
    """The DER of the file's first certificate, checked by OpenSSL, and the file's
    bytes (the whole chain it holds)."""
    data = _read(path)
    try:
        found = der.certificates(data)
        if not found:
            raise ValueError("no CERTIFICATE block")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=ssl.DER_cert_to_PEM_cert(found[0])
        )
    except (ValueError, ssl.SSLError) as err:
        raise pki.PkiError(f"{path}: not a PEM certificate ({err})") from None
    return found[0], data


def prepare(urls: str | Sequence[str], tls: TlsFiles | None) -> Prepared | None:
    """What the store connects with: credentials (and the identity) for ``https://``
    endpoints, None for the lab mode; :class:`EtcdTlsError` naming the option to fix
    otherwise."""
    if not check(urls, tls) or tls is None:
        return None
    try:
        return credentials(tls)
    except pki.PkiError as err:
        raise EtcdTlsError(f"etcd TLS: {err}") from None


def secure_channel(target: str, creds: Credentials, options: Mapping[str, Any]) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, creds, options=list(options.items()))


def warn_if_plain(secure: bool, log: EventLog, etcd: str) -> None:
    """The lab mode's warning, once at a daemon's start."""
    if not secure:
        log.warning(
            "etcd in lab mode: its traffic is in clear and unauthenticated; "
            "use https:// endpoints with --etcd-ca, --etcd-cert and --etcd-key",
            etcd=etcd,
        )


# ---- options ----------------------------------------------------------------------


def files(
    ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> TlsFiles | None:
    """The TLS files given (empty counts as not given), None when no CA is.

    A certificate or key without the CA is refused: it would not be used."""
    ca, cert, key = (Path(v) if v else None for v in (ca, cert, key))
    if ca is None:
        if cert is not None or key is not None:
            raise EtcdTlsError(
                f"{_given('cert' if cert is not None else 'key')} given without "
                f"{_given('ca')}: TLS to etcd needs the CA that signed its certificate"
            )
        return None
    return TlsFiles(ca, cert, key)


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--etcd-ca``, ``--etcd-cert`` and ``--etcd-key``, defaulting to the environment."""
    helps = {
        "ca": "the CA that signed etcd's certificate; needed for https:// endpoints",
        "cert": "this component's certificate for etcd (its CN is the etcd user)",
        "key": "the key of --etcd-cert (mode 0600, owned by this user)",
    }
    for name, option in OPTION.items():
        parser.add_argument(
            option,
            metavar="FILE",
            dest=f"etcd_{name}",
            default=os.environ.get(ENV[name]) or None,
            help=f"{helps[name]} (default: ${ENV[name]})",
        )


def from_args(args: argparse.Namespace) -> TlsFiles | None:
    return files(args.etcd_ca, args.etcd_cert, args.etcd_key)


class EtcdTlsSettings(BaseModel):
    """The same three settings in a daemon's pydantic settings (``HAPAIR_ETCD_CA``...)."""

    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None

    @field_validator("etcd_ca", "etcd_cert", "etcd_key", mode="before")
    @classmethod
    def _empty(cls, value: object) -> object:
        return None if value == "" else value  # an empty variable: not given

    @property
    def etcd_tls(self) -> TlsFiles | None:
        return files(self.etcd_ca, self.etcd_cert, self.etcd_key)

    @field_validator("etcd", check_fields=False)
    @classmethod
    def _usable(cls, value: str, info: ValidationInfo) -> str:
        # The settings' ``etcd``, checked with the TLS files (validated before it): every
        # file read and checked now, a wrong one a start-up error naming it.
        given = (info.data.get(f"etcd_{name}") for name in OPTION)
        prepare(value, files(*given))
        return value


def service_env(tls: TlsFiles | None) -> dict[str, str]:
    """What the agent passes on to the services it runs: the CA, never its own
    certificate (a service shows etcd its own, from its ``env:`` in the site file)."""
    return {} if tls is None else {ENV["ca"]: str(tls.ca)}
