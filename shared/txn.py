"""The words of an etcd transaction: what must hold, and what to write.

A transaction applies its ``success`` operations if every :class:`Compare` holds, its
``failure`` operations otherwise, all at one revision. Keys are the ``str`` that
:mod:`hapair.shared.keys` spells and values are bytes; only :func:`txn_request` turns them into
etcd's messages, so no caller handles the wire form.

In etcd a key that does not exist has create, mod revision and version 0, and its value
equals nothing (a value compare on it is always false).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aetcd import rpc

_TARGETS = {
    "create": rpc.Compare.CREATE,
    "mod": rpc.Compare.MOD,
    "version": rpc.Compare.VERSION,
    "value": rpc.Compare.VALUE,
}


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition on one key: its ``target`` equals ``expected``."""

    key: str
    target: Literal["create", "mod", "version", "value"]
    expected: int | bytes

    @classmethod
    def created(cls, key: str, revision: int) -> Compare:
        """``key`` was created at ``revision`` (a leader key's epoch); 0: it does not exist."""
        return cls(key, "create", revision)

    @classmethod
    def modified(cls, key: str, revision: int) -> Compare:
        """``key`` was last written at ``revision``; 0: it does not exist."""
        return cls(key, "mod", revision)

    @classmethod
    def value(cls, key: str, value: bytes) -> Compare:
        """``key`` exists and holds exactly ``value``."""
        return cls(key, "value", value)

    @classmethod
    def absent(cls, key: str) -> Compare:
        """``key`` does not exist."""
        return cls(key, "version", 0)

    def message(self) -> object:
        compare = rpc.Compare(key=self.key.encode(), result=rpc.Compare.EQUAL)
        compare.target = _TARGETS[self.target]
        match self.target, self.expected:
            case "value", bytes() as value:
                compare.value = value
            case "create", int() as revision:
                compare.create_revision = revision
            case "mod", int() as revision:
                compare.mod_revision = revision
            case "version", int() as version:
                compare.version = version
            case _:
                raise TypeError(f"{self.target} compared with {self.expected!r}")
        return compare


@dataclass(frozen=True, slots=True)
class Op:
    """One write: put ``value`` at ``key`` (bound to ``lease`` if given), or delete it."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes = b""
    lease: int | None = None

    @classmethod
    def put(cls, key: str, value: bytes, lease: int | None = None) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: str) -> Op:
        return cls("delete", key)

    def message(self) -> object:
        if self.kind == "put":
            put = rpc.PutRequest(key=self.key.encode(), value=self.value, lease=self.lease or 0)
            return rpc.RequestOp(request_put=put)
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.key.encode()))


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether every compare held, and the store revision after the transaction: that
    of its writes when it wrote anything."""

    succeeded: bool
    revision: int


def txn_request(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> object:
    """etcd's ``TxnRequest`` for these words."""
    return rpc.TxnRequest(
        compare=[c.message() for c in compare],
        success=[o.message() for o in success],
        failure=[o.message() for o in failure],
    )
