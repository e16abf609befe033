"""What every ``hapair`` command shares: its exit codes and how it fails, its output,
the operator it names, and its connection to etcd.

A command prints what it changed with :func:`say`; when it cannot, it raises
:class:`Failed` with the exit code ``main`` ends with (``cli.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import socket
from collections.abc import AsyncIterator
from datetime import datetime

from hapair.shared import etcd_tls
from hapair.shared.store import Store

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3
ETCD_TIMEOUT_S = 2.0


class Failed(Exception):
    """The command could not do what it was asked: ``code`` is its exit code, ``details``
    the lines printed under its message."""

    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or []


def say(message: str) -> None:
    print(message, flush=True)


def operator(store: Store) -> str:
    """Who the events and flags name. With a client certificate, its CN, which etcd
    checked (``HAPAIR_OPERATOR``, if set, follows in brackets: a name declared, not
    proven); in the lab mode ``HAPAIR_OPERATOR``, else user@host."""
    declared = os.environ.get("HAPAIR_OPERATOR", "")
    if store.identity is not None:
        return f"{store.identity} ({declared})" if declared else store.identity
    if declared:
        return declared
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


def when(stamp: float) -> str:
    """A record's wall-clock time stamp, in the operator's local time."""
    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


@contextlib.asynccontextmanager
async def connected(args: argparse.Namespace) -> AsyncIterator[Store]:
    if not args.etcd:
        raise Failed(USAGE, "no etcd given: use --etcd URL or set HAPAIR_ETCD")
    try:
        store = Store(args.etcd, timeout=ETCD_TIMEOUT_S, tls=etcd_tls.from_args(args))
    except ValueError as err:
        raise Failed(USAGE, str(err)) from None
    try:
        yield store
    finally:
        await store.close()
