"""``hapair pki``: the site CA, the components' certificates and the pairs' peer keys.

Files only, no etcd: each command prints the paths it wrote, or one line saying why it
wrote nothing (exit 2 for a wrong request, 1 when a file exists or cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from hapair.registry.console.command import OK, REFUSED, USAGE
from hapair.shared import pki


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pki`` and its three actions, on the ``hapair`` command's subparsers."""
    top = sub.add_parser("pki", help="make the site's CA, certificates and peer keys")
    actions = top.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    p = actions.add_parser("init", help="create the site CA (ca.crt, ca.key) in DIR")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--site", required=True, metavar="NAME", help="the site the CA is for")
    p.set_defaults(func=pki_init)

    kinds = "; ".join(f"{k.value}: {profile.purpose}" for k, profile in pki.PROFILES.items())
    p = actions.add_parser(
        "issue",
        help="issue NAME.crt and NAME.key in DIR, signed by its CA",
        description=f"Kinds: {kinds}. The certificate's CN is NAME: the user etcd and "
        "the registry see.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("kind", metavar="KIND", help=", ".join(k.value for k in pki.Kind))
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="an address clients use"
    )
    p.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="a host name clients use"
    )
    p.add_argument(
        "--uri",
        metavar="URI",
        help="comm and opcua-client only: the OPC UA application URI "
        "(default urn:hapair:KIND:NAME)",
    )
    p.add_argument(
        "--rsa-bits",
        type=int,
        metavar="BITS",
        help="comm and opcua-client only: the RSA key's size, "
        f"{' or '.join(map(str, pki.RSA_BITS))} (default {pki.RSA_BITS[0]})",
    )
    p.add_argument("--force", action="store_true", help="replace NAME.crt and NAME.key")
    p.set_defaults(func=pki_issue)

    p = actions.add_parser(
        "peer-key", help="a random key for a pair's peer path: DIR/peer-PAIR.key"
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("pair", metavar="PAIR")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=pki_peer_key)


Action = Callable[[argparse.Namespace], list[str]]


def _command(action: Action) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    """A ``hapair`` command that prints the lines of ``action``, or its one-line refusal."""

    async def run(args: argparse.Namespace) -> int:
        try:
            lines = action(args)
        except (pki.PkiError, OSError) as err:
            print(f"hapair: {err}", file=sys.stderr)
            return REFUSED if isinstance(err, pki.Exists | OSError) else USAGE
        for line in lines:
            print(line, flush=True)
        return OK

    return run


def _wrote(issued: pki.Issued) -> list[str]:
    return [f"wrote {issued.cert}", f"wrote {issued.key}"]


@_command
def pki_init(args: argparse.Namespace) -> list[str]:
    return _wrote(pki.init(args.dir, args.site))


@_command
def pki_issue(args: argparse.Namespace) -> list[str]:
    return _wrote(
        pki.issue(
            args.dir,
            args.kind,
            args.name,
            args.ip,
            args.dns,
            uri=args.uri,
            rsa_bits=args.rsa_bits,
            force=args.force,
        )
    )


@_command
def pki_peer_key(args: argparse.Namespace) -> list[str]:
    path = pki.peer_key(args.dir, args.pair, force=args.force)
    return [
        f"wrote {path}",
        f"copy it to both nodes of {args.pair} (mode 0600), never into etcd",
    ]
