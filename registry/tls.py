"""HTTPS for the registry: its certificate and key, and the CA of the operators'
client certificates when those are accepted as an admin credential."""

from __future__ import annotations

import ssl
from pathlib import Path

from hapair.shared import pki
from hapair.shared.pki import PkiError, TlsFiles


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ with ``cert``; with ``client_ca``, a client may show a certificate, which
    the handshake verifies against it (none is required: lookups need none)."""
    if client_ca is not None:
        return TlsFiles(client_ca, cert, key).server_context(require_client_cert=False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    pki.check_private(key)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise PkiError(f"{cert}, {key}: not a certificate and its key ({err})") from None
    return context
