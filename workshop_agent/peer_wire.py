"""The messages of the peer path, and their authenticated encoding (no sockets here).

Agents of a pair exchange small UDP datagrams (``workshop_agent/peer_path.py`` sends and
receives them): pings and their answers, and the hold protocol of an active that cannot
reach etcd (``workshop_agent/hold.py``). Anyone on a plant network can send a datagram
with any source address, so every datagram is sealed: 64 hex digits of HMAC-SHA256,
under the pair's key, over the JSON body that follows them, which names the sender's
run (a random nonce and when the run started, chosen when the agent starts) and the
number of the datagram in that run. A receiver (:class:`PeerAuth`) drops a datagram
whose MAC is wrong, a replay (a number not above the last it took from that run), and
any datagram of a sender's run older than the newest it has seen; in the lab mode (no
key file) the MAC is computed with an empty key, which authenticates nothing. Opening a
datagram never raises: anything malformed, too big, of an unknown kind or not sealed is
dropped with the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_DATAGRAM = 1024
MAC_HEX = 64  # HMAC-SHA256 in hex: a body that is still plain JSON for a capture to read
LAB_KEY = b""  # the lab mode: anyone can seal, the replay and run checks still hold
MAX_TTL = 3600.0
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
    """The active, late with etcd: "do not campaign while you hear me" (term ``epoch``);
    ``beat``: a hold that stands in for a beat of its term (``beating.py``), not one for
    its lease (sent only when set: a peer that does not know it reads a hold)."""

    sender: str
    seq: int
    epoch: int
    ttl: float
    beat: bool = False


@dataclass(frozen=True, slots=True)
class HoldReply:
    """A peer's answer to a hold: ``promised``, or why not."""

    sender: str
    to: str
    seq: int
    epoch: int
    promised: bool
    reason: str = ""
    ttl: float = 0.0  # how long the promise lasts on the peer's clock (0: no promise)
    # A promise in place of a beat that outlives a release (``hold.py``); an older
    # peer's ended at a release, and says nothing (sent only when set).
    kept: bool = False

    @classmethod
    def answering(cls, hold: Hold, me: str, promised: bool, reason: str, ttl: float) -> HoldReply:
        """This node's answer to ``hold``: a promise in place of a beat is kept past a
        release (``hold.py``), and says so."""
        kept = promised and hold.beat
        return cls(me, hold.sender, hold.seq, hold.epoch, promised, reason, ttl, kept)


@dataclass(frozen=True, slots=True)
class Release:
    """The former holder, its services stopped: the promises for ``epoch`` are over."""

    sender: str
    seq: int
    epoch: int


Message = Ping | Pong | Hold | HoldReply | Release
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Run:
    """One run of a sender's peer path: a later run has a later ``born``."""

    born: int  # wall clock at its start, in ns: orders the runs of a sender
    nonce: str  # 16 random hex digits: two runs never share a name

    @classmethod
    def new(cls) -> Run:
        return cls(time.time_ns(), os.urandom(8).hex())


@dataclass(frozen=True, slots=True)
class Dropped:
    """Why a datagram was dropped; ``sender`` as it claims to be, once its MAC is good."""

    reason: str
    sender: str | None = None


class PeerAuth:
    """Seals this run's datagrams and opens the peers' with the pair's ``key``
    (None: the lab mode); ``peers`` are the other nodes of the pair.

    One lives as long as the agent: a peer path opened again (a new topology, a new key)
    keeps the run, its count and what it took from each peer, so nothing captured
    before can be replayed to it."""

    def __init__(
        self, key: bytes | None, peers: Iterable[str] = (), run: Run | None = None
    ) -> None:
        self.key = key
        self.peers = frozenset(peers)
        self.run = run or Run.new()
        self._sent = 0
        self._seen: dict[str, tuple[Run, int]] = {}  # per peer: its newest run, last number

    @property
    def key(self) -> bytes:
        return self._key

    @key.setter
    def key(self, key: bytes | None) -> None:
        self._key = LAB_KEY if key is None else key

    def seal(self, msg: Message) -> bytes:
        self._sent += 1
        fields = {**_body(msg), "run": self.run.nonce, "born": self.run.born, "n": self._sent}
        body = json.dumps(fields, separators=(",", ":")).encode()
        return _mac(self._key, body) + body

    def open(self, data: bytes) -> Message | Dropped:
        """The message, if it is sealed with the key, from a peer, and new."""
        if len(data) > MAX_DATAGRAM:
            return Dropped("too big")
        body = data[MAC_HEX:]
        if not hmac.compare_digest(data[:MAC_HEX], _mac(self._key, body)):
            return Dropped("bad MAC")
        fields = _json(body)
        msg = _message(fields) if fields is not None else None
        if fields is None or msg is None:
            return Dropped("malformed")
        run, n = _run(fields), fields.get("n")
        if run is None or type(n) is not int or n <= 0:
            return Dropped("malformed", msg.sender)
        if msg.sender not in self.peers:
            return Dropped("not a peer", msg.sender)
        seen = self._seen.get(msg.sender)
        if seen is not None:
            if run == seen[0] and n <= seen[1]:
                return Dropped("replayed", msg.sender)
            if run != seen[0] and run.born <= seen[0].born:
                return Dropped("older run", msg.sender)
        self._seen[msg.sender] = (run, n)
        return msg


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _run(fields: dict[str, Any]) -> Run | None:
    nonce, born = fields.get("run"), fields.get("born")
    if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{16}", nonce):
        return None
    if type(born) is not int or born < 0:
        return None
    return Run(born, nonce)


def _body(msg: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 2, "from": msg.sender, "seq": msg.seq}
    match msg:
        case Ping():
            body["t"] = "ping"
        case Pong():
            body.update(t="pong", to=msg.to, sees=msg.sees)
        case Hold():
            body.update(t="hold", epoch=msg.epoch, ttl=msg.ttl)
            if msg.beat:
                body["beat"] = True
        case HoldReply():
            body.update(
                t="held",
                to=msg.to,
                epoch=msg.epoch,
                promised=msg.promised,
                reason=msg.reason[:MAX_REASON],
                ttl=msg.ttl,
            )
            if msg.kept:
                body["kept"] = True
        case Release():
            body.update(t="release", epoch=msg.epoch)
    return body


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and _NAME.match(value) else None


def _seconds(value: object) -> float | None:
    """A TTL on the wire: a number of seconds from 0 to ``MAX_TTL``."""
    # bool is an int in Python: refuse it explicitly.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return float(value) if 0 <= value <= MAX_TTL else None


def _message(body: dict[str, Any]) -> Message | None:
    """A well-formed message, or None for anything else (never raises)."""
    if body.get("v") != 2:
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
        ttl, beat = _seconds(body.get("ttl")), body.get("beat", False)
        return Hold(sender, seq, epoch, ttl, beat) if ttl and type(beat) is bool else None
    if kind == "release":
        return Release(sender, seq, epoch)
    if kind == "held":
        promised, reason, ttl = body.get("promised"), body.get("reason"), _seconds(body.get("ttl"))
        kept = body.get("kept", False)
        if to is None or type(promised) is not bool or not isinstance(reason, str) or ttl is None:
            return None
        if type(kept) is not bool:
            return None
        return HoldReply(sender, to, seq, epoch, promised, reason[:MAX_REASON], ttl, kept)
    return None
