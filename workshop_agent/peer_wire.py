"""The messages of the peer path, and their encoding on the wire (no sockets here).

Agents of a pair exchange small UDP datagrams (``workshop_agent/peer_path.py`` sends and
receives them): pings and their answers, and the hold protocol of an active that cannot
reach etcd (``workshop_agent/hold.py``). Decoding never raises: anything malformed,
too big or of an unknown kind is dropped as ``None``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_DATAGRAM = 512
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Ping:
    sender: str
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    sender: str
    to: str
    seq: int
    sees: bool | None  # does the responder see the pinger?


@dataclass(frozen=True, slots=True)
class Hold:
    """The active, late with etcd: "do not campaign while you hear me" (term ``epoch``)."""

    sender: str
    seq: int
    epoch: int
    ttl: float


@dataclass(frozen=True, slots=True)
class HoldReply:
    """A peer's answer to a hold: ``promised``, or why not."""

    sender: str
    to: str
    seq: int
    epoch: int
    promised: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Release:
    """The former holder, its services stopped: the promises for ``epoch`` are over."""

    sender: str
    seq: int
    epoch: int


Message = Ping | Pong | Hold | HoldReply | Release
MAX_REASON = 200


def encode(msg: Message) -> bytes:
    body: dict[str, Any] = {"v": 1, "from": msg.sender, "seq": msg.seq}
    match msg:
        case Ping():
            body["t"] = "ping"
        case Pong():
            body.update(t="pong", to=msg.to, sees=msg.sees)
        case Hold():
            body.update(t="hold", epoch=msg.epoch, ttl=msg.ttl)
        case HoldReply():
            body.update(
                t="held", to=msg.to, epoch=msg.epoch, promised=msg.promised, reason=msg.reason
            )
        case Release():
            body.update(t="release", epoch=msg.epoch)
    return json.dumps(body, separators=(",", ":")).encode()


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and _NAME.match(value) else None


def decode(data: bytes) -> Message | None:
    """A well-formed message, or None for anything else (never raises)."""
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("v") != 1:
        return None
    sender, seq = _name(body.get("from")), body.get("seq")
    # bool is an int in Python: refuse it explicitly.
    if sender is None or type(seq) is not int or not 0 <= seq < 2**32:
        return None
    kind, to = body.get("t"), _name(body.get("to"))
    if kind == "ping":
        return Ping(sender, seq)
    if kind == "pong":
        sees = body.get("sees")
        if to is None or sees not in (True, False, None):
            return None
        return Pong(sender, to, seq, sees)
    epoch = body.get("epoch")
    if type(epoch) is not int or epoch <= 0:
        return None
    if kind == "hold":
        ttl = body.get("ttl")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= 3600:
            return None
        return Hold(sender, seq, epoch, float(ttl))
    if kind == "release":
        return Release(sender, seq, epoch)
    if kind == "held":
        promised, reason = body.get("promised"), body.get("reason")
        if to is None or type(promised) is not bool or not isinstance(reason, str):
            return None
        return HoldReply(sender, to, seq, epoch, promised, reason[:MAX_REASON])
    return None
