"""``hapair package hash FILE [--url URL] [--version V]``: the ``package:`` block of a
service's entry in the site file, to paste, with the file's sha256.

Files only, no etcd. The URL defaults to ``file://`` and the file's absolute path (a
plant's shared drive, or media copied by hand to the same path on every node); the
version to the one the file's name ends with (``mes-api-2.4.1.tar.gz``: ``2.4.1``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from hapair.registry.console.command import OK, REFUSED, USAGE
from hapair.shared.package import ARCHIVES, Package, sha256_file
from hapair.shared.validation import format_errors

_VERSION_IN_NAME = re.compile(r"[-_]v?(\d[A-Za-z0-9._+~-]*)$")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``package`` and its action, on the ``hapair`` command's subparsers."""
    top = sub.add_parser("package", help="the package: block of a service's software")
    actions = top.add_subparsers(dest="package_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "hash",
        help="print the package: block for FILE (its sha256) to paste into the site file",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument(
        "--url",
        help="where the nodes fetch it: https://, http:// or file:// (default: file://FILE)",
    )
    p.add_argument("--version", help="the version (default: the one FILE's name ends with)")
    p.set_defaults(func=package_hash)


def version_in_name(name: str) -> str | None:
    """``2.4.1`` of ``mes-api-2.4.1.tar.gz``; None when the name holds no version."""
    lowered = name.lower()
    suffix = next((s for s in ARCHIVES if lowered.endswith(s)), "")
    match = _VERSION_IN_NAME.search(name[: len(name) - len(suffix)] if suffix else name)
    return match.group(1) if match else None


async def package_hash(args: argparse.Namespace) -> int:
    return await asyncio.to_thread(_hash, args)  # a file of gigabytes is read whole


def _hash(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        print(f"hapair: {path}: not a file", file=sys.stderr)
        return USAGE
    version = args.version or version_in_name(path.name)
    if version is None:
        print(
            f"hapair: {path.name}: no version in the file's name; give --version V",
            file=sys.stderr,
        )
        return USAGE
    try:
        digest = sha256_file(path)
    except OSError as err:
        print(f"hapair: {path}: cannot be read: {err.strerror or err}", file=sys.stderr)
        return REFUSED
    url = args.url or path.resolve().as_uri()
    try:
        package = Package(version=version, url=url, sha256=digest)
    except ValidationError as err:
        for problem in format_errors(err):
            print(f"hapair: {problem}", file=sys.stderr)
        return USAGE
    print(f"# {path.name}: {path.stat().st_size} bytes; paste under the service's entry")
    print("package:")
    for field in ("version", "url", "sha256"):
        print(f"  {field}: {json.dumps(getattr(package, field))}")  # YAML reads JSON strings
    return OK
