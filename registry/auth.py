"""Who may use the admin routes, and what a request to them must look like.

The admin routes are closed unless the registry is given a way to tell operators
apart: named bearer tokens (``NAME:SHA256`` entries; the registry keeps only digests),
client certificates from a CA it is given (the certificate's CN names the operator),
or, in a lab, ``--open-admin``. The name is the operator the events and flags show.

Every admin request must say ``Content-Type: application/json``: a web page on another
site can make a browser send a form, plain text or a body-less POST to the registry
without asking first (and with the operator's client certificate), but not that.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from hapair.registry.appkeys import CONFIG
from hapair.registry.errors import BadRequest, Forbidden, Unauthorized, UnsupportedMediaType
from hapair.shared import pki

DIGEST = re.compile(r"^[0-9a-f]{64}$")
JSON = "application/json"
CLOSED = (
    "admin routes are closed on this registry: start it with --admin-tokens-file FILE "
    "(or HAPAIR_ADMIN_TOKENS) to accept named bearer tokens, with --client-ca FILE to "
    "accept operators' client certificates, or with --open-admin in a lab"
)
# Certificates hapair pki issues name their kind (OU): every kind but these two is a
# component's (or a scraper's), not an operator's, even though the site CA signed it.
NOT_OPERATORS = frozenset(pki.Kind) - {pki.Kind.OPERATOR, pki.Kind.ADMIN}


# ---- tokens -----------------------------------------------------------------------


def parse_tokens(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``(where, "NAME:SHA256")`` entries as {digest: name}; a bare digest is named
    ``token ABCDEF01``. ValueError naming ``where`` for a bad entry or a name twice."""
    names: dict[str, str] = {}
    where_named: dict[str, str] = {}
    for where, entry in entries:
        name, colon, digest = entry.strip().rpartition(":")
        digest = digest.strip().lower()
        if not DIGEST.match(digest):
            raise ValueError(
                f"{where}: expected NAME:SHA256, a name and the SHA-256 of its token in 64 "
                "hex digits (printf %s TOKEN | sha256sum)"
            )
        name = name.strip() if colon else f"token {digest[:8]}"
        if colon and not pki.CERT_NAME.match(name):
            raise ValueError(f"{where}: name {name!r}: letters, digits, '.', '_', '@' and '-' only")
        if name in where_named:
            raise ValueError(f"{where}: {name} named twice (also at {where_named[name]})")
        if digest in names:
            raise ValueError(f"{where}: this token is already {names[digest]}'s")
        names[digest], where_named[name] = name, where
    return names


def token_file_entries(path: Path) -> list[tuple[str, str]]:
    """A token file's entries for :func:`parse_tokens`: one ``NAME:SHA256`` a line,
    ``#`` to the end of a line a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None
    lines = ((f"{path}:{n}", line.partition("#")[0]) for n, line in enumerate(text.splitlines(), 1))
    return [(where, line) for where, line in lines if line.strip()]


# ---- the operator -----------------------------------------------------------------


def operator(request: web.Request) -> str:
    """The name of whoever sends this admin request; refuses anyone else (403, or 401
    for a credential that does not hold)."""
    config = request.app[CONFIG]
    if config.admin_tokens or config.client_certs:
        header = request.headers.get("Authorization")
        if header is not None:
            return _token_name(header, config.admin_tokens)
        name = _certificate_name(request) if config.client_certs else None
        if name is None:
            wanted = ["a bearer token (Authorization: Bearer TOKEN)"] if config.admin_tokens else []
            wanted += ["an operator's client certificate"] if config.client_certs else []
            raise Unauthorized("admin routes need " + " or ".join(wanted))
        return name
    if config.open_admin:
        return f"http from {request.remote}"
    raise Forbidden(CLOSED)


def _token_name(header: str, tokens: Mapping[str, str]) -> str:
    scheme, _, token = header.partition(" ")
    # A lookup by the digest tells a timing attacker nothing of any token: finding a
    # token from its SHA-256 is what the digest makes impossible.
    name = tokens.get(hashlib.sha256(token.strip().encode()).hexdigest())
    if scheme.lower() != "bearer" or name is None:
        raise Unauthorized("admin routes: this bearer token is not accepted")
    return name


def _certificate_name(request: web.Request) -> str | None:
    """The operator the client certificate shown names; None when none was shown."""
    shown = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = shown.getpeercert(binary_form=True) if isinstance(shown, ssl.SSLObject) else None
    if not der:
        return None
    # The TLS handshake verified it against the client CA; what is left is whose it is.
    certificate = x509.load_der_x509_certificate(der)
    name = pki.common_name(certificate)
    kinds = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    kind = str(kinds[0].value) if kinds else ""
    if kind in NOT_OPERATORS or not name:
        raise Forbidden(
            f"certificate {name!r} is a {kind or 'nameless'} certificate, not an operator's"
        )
    return name


# ---- the body ---------------------------------------------------------------------


async def json_body(request: web.Request) -> object:
    """The request's JSON body ({} when empty); only ``application/json`` is taken."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(
            f"admin requests must be sent with Content-Type: {JSON} "
            f"(got {request.headers.get('Content-Type') or 'none'}), even with no body"
        )
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("invalid body: nested too deeply", ["(body): nested too deeply"]) from None
    except ValueError as err:
        raise BadRequest(f"invalid body: not JSON ({err})", ["(body): not JSON"]) from None
