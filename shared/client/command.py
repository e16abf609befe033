"""``hapair resolve SERVICE [--watch]``: where a service is, for shell scripts.

Prints ``HOST:PORT`` (or a URL, or a JSON line) of the service's valid endpoint; with
``--watch``, one more line each time it moves, until interrupted. Warnings (a registry
gone, garbage ignored, the endpoint stale) go to standard error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
from dataclasses import asdict

from hapair.shared.client.errors import RegistryUnavailable, ServiceUnavailable, UnknownService
from hapair.shared.client.models import Endpoint
from hapair.shared.client.registries import registry_ssl
from hapair.shared.client.resolver import Resolver
from hapair.shared.log import LogfmtFormatter

REFUSED, USAGE, UNREACHABLE = 1, 2, 3
FORMATS = ("addr", "url", "json")


class CommandError(Exception):
    """Why the command failed, with its exit status (hapair's: 1, 2 or 3)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def add_registry_ca(p: argparse.ArgumentParser) -> None:
    """``--registry-ca FILE`` (``$HAPAIR_REGISTRY_CA``): the CA https:// registries are
    checked against (default: the system's)."""
    p.add_argument(
        "--registry-ca",
        default=os.environ.get("HAPAIR_REGISTRY_CA") or None,
        metavar="FILE",
        help="the CA of the registries' certificates, for https:// URLs "
        "(default: $HAPAIR_REGISTRY_CA, else the system's CAs)",
    )


def add_registry_cert(p: argparse.ArgumentParser) -> None:
    """``--registry-cert FILE --registry-key FILE``: an operator's client certificate
    for a registry's admin routes (``$HAPAIR_REGISTRY_CERT``, ``$HAPAIR_REGISTRY_KEY``)."""
    for name, what in (("cert", "an operator's client certificate"), ("key", "its key")):
        p.add_argument(
            f"--registry-{name}",
            default=os.environ.get(f"HAPAIR_REGISTRY_{name.upper()}") or None,
            metavar="FILE",
            help=f"{what} for the registry's admin routes "
            f"(default: $HAPAIR_REGISTRY_{name.upper()})",
        )


def ssl_of(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of the registry options in ``args``; CommandError (2) naming the
    file that cannot be used."""
    try:
        return registry_ssl(
            args.registry_ca,
            getattr(args, "registry_cert", None),
            getattr(args, "registry_key", None),
        )
    except ValueError as err:
        raise CommandError(USAGE, str(err)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("service", help="the service's name in the site file")
    p.add_argument(
        "--registry",
        default=os.environ.get("HAPAIR_REGISTRY"),
        help="registries URL[,URL...], the next used when one fails (default: $HAPAIR_REGISTRY)",
    )
    add_registry_ca(p)
    p.add_argument("--watch", action="store_true", help="print one more line each time it moves")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="addr",
        help="addr: HOST:PORT (default); url: PROTOCOL://HOST:PORT; json: the whole record",
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="when the service has no endpoint now (failing over), wait this long for one",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def format_endpoint(endpoint: Endpoint, fmt: str) -> str:
    if fmt == "url":
        return endpoint.url()
    if fmt == "json":
        return json.dumps(asdict(endpoint), separators=(",", ":"))
    return endpoint.address


async def resolve(args: argparse.Namespace) -> int:
    if not args.registry:
        raise CommandError(
            USAGE, "no registry given: use --registry URL[,URL...] or set HAPAIR_REGISTRY"
        )
    try:
        resolver = Resolver(args.registry, registry_ca=args.registry_ca)
    except ValueError as err:
        raise CommandError(USAGE, str(err)) from None
    _warnings_to_stderr()
    async with resolver:
        try:
            if not args.watch:
                endpoint = await resolver.resolve(args.service, wait_s=args.wait)
                print(format_endpoint(endpoint, args.format), flush=True)
                return 0
            async for endpoint in resolver.watch(args.service):
                print(format_endpoint(endpoint, args.format), flush=True)
        except (UnknownService, ServiceUnavailable) as err:
            raise CommandError(REFUSED, str(err)) from None
        except RegistryUnavailable as err:
            raise CommandError(UNREACHABLE, str(err)) from None
    return 0


def _warnings_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    client = logging.getLogger("hapair.client")
    client.handlers[:] = [handler]
    client.setLevel(logging.WARNING)
    client.propagate = False
