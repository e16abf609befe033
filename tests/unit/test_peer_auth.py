"""The peer path's authentication (peer_wire.py): every datagram sealed with the pair's
key, this run's nonce and a sequence number; what a receiver drops. And what a
promise may be asked for (hold.py): never longer than the receiver's own TTL, never for
an epoch far ahead of what it saw in etcd."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from hapair.shared.log import EventLog
from hapair.shared.network import Network
from hapair.shared.pki import load_peer_key, peer_key
from hapair.workshop_agent.hold import Ledger, Promises
from hapair.workshop_agent.netwatch import NetWatch
from hapair.workshop_agent.peer_wire import (
    Dropped,
    Hold,
    HoldReply,
    Message,
    PeerAuth,
    Ping,
    Pong,
    Release,
    Run,
)
from hapair.workshop_agent.probe_results import ProbeError

KEY = bytes(range(32))
HOLD = Hold("a", 7, 12, 2.0)


def auth(key: bytes | None = KEY, born: int = 1_000, peers: tuple[str, ...] = ("a",)) -> PeerAuth:
    return PeerAuth(key, peers, run=Run(born, os.urandom(8).hex()))


def dropped(result: Message | Dropped, reason: str) -> bool:
    return isinstance(result, Dropped) and result.reason == reason


@pytest.mark.parametrize(
    "msg",
    [
        Ping("a", 1),
        Pong("a", "b", 1, None),
        HOLD,
        HoldReply("a", "b", 7, 12, True, ttl=2.0),
        HoldReply("a", "b", 7, 12, False, "this node is active"),
        Release("a", 8, 12),
    ],
)
def test_a_sealed_datagram_from_a_peer_is_accepted(msg: Message) -> None:
    assert auth().open(auth().seal(msg)) == msg


def test_every_tampered_byte_is_dropped() -> None:
    data = auth().seal(HOLD)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            tampered = data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :]
            assert isinstance(auth().open(tampered), Dropped), (i, bit)


def test_a_datagram_sealed_with_another_key_is_dropped() -> None:
    other = auth(bytes(32))
    assert dropped(auth().open(other.seal(HOLD)), "bad MAC")
    assert dropped(auth(None).open(auth().seal(HOLD)), "bad MAC"), "lab vs key"
    assert dropped(auth().open(auth(None).seal(HOLD)), "bad MAC"), "key vs lab"


def test_an_unsealed_datagram_is_dropped() -> None:
    """What today's unauthenticated senders and forgers send: the bare message."""
    bare = {"v": 1, "from": "a", "seq": 7, "t": "hold", "epoch": 12, "ttl": 2.0}
    b = auth()
    assert isinstance(b.open(json.dumps(bare).encode()), Dropped)
    assert isinstance(b.open(json.dumps({**bare, "v": 2}).encode()), Dropped)


def test_a_replayed_datagram_is_dropped() -> None:
    a, b = auth(), auth()
    first, second = a.seal(HOLD), a.seal(Release("a", 8, 12))
    assert b.open(first) == HOLD
    assert dropped(b.open(first), "replayed")
    assert b.open(second) == Release("a", 8, 12)
    assert dropped(b.open(first), "replayed"), "an earlier datagram, after a later one"
    assert dropped(b.open(second), "replayed")


def test_an_older_runs_datagram_is_dropped_once_a_newer_run_is_seen() -> None:
    old, new, b = auth(born=1_000), auth(born=2_000), auth()
    captured = old.seal(Release("a", 8, 12))
    later_old = old.seal(HOLD)
    assert b.open(old.seal(Ping("a", 1))) == Ping("a", 1)
    assert b.open(new.seal(HOLD)) == HOLD, "a restarted peer: its new run is taken"
    assert dropped(b.open(captured), "older run")
    assert dropped(b.open(later_old), "older run"), "even with a sequence number never seen"
    assert b.open(new.seal(Ping("a", 2))) == Ping("a", 2)


def test_a_datagram_from_a_node_not_a_peer_is_dropped() -> None:
    """A node of another pair sharing the key by mistake, or one removed from the pair."""
    c = auth()
    assert dropped(auth().open(c.seal(Hold("c", 1, 12, 2.0))), "not a peer")


def test_garbage_never_raises() -> None:
    b = auth()
    sealed = auth().seal(HOLD)
    garbage = [b"", b"{", b"\xff" * 2000, sealed[:64], sealed + b"x", os.urandom(300)]
    garbage += [sealed[:64] + json.dumps(v).encode() for v in ([], 1, None, "x", {"v": 2})]
    for data in garbage:
        assert isinstance(b.open(data), Dropped), data


def test_a_huge_ttl_is_capped_at_the_receivers_own() -> None:
    promises = Promises()
    promised, _, _ = promises.answer(
        Hold("a", 1, 5, 3600.0), 100.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert promised
    assert promises.binding(101.9) is not None
    assert promises.binding(102.0) is None, "promised for the receiver's TTL, no longer"


def test_the_active_counts_a_shorter_promise_as_ending_earlier() -> None:
    """A receiver whose TTL is shorter (a topology change in flight) grants less than
    asked; the active's fence point moves only as far as what was granted."""
    ledger = Ledger()
    ledger.sent(5, 1, 10.0, 3.0)
    assert ledger.answer(HoldReply("b", "a", 1, 5, True, ttl=2.0))
    assert ledger.deadline(["b"], 2.5) == pytest.approx(10.0 + 2.5 - 1.0)


@pytest.mark.parametrize(
    ("epoch", "newest", "revision", "promised"),
    [
        (5, 5, 5, True),
        (6, 5, 5, True),
        (7, 5, 5, False),
        (2**40, 5, 5, False),
        (2**40, 5, 90, False),
        (5, None, 0, False),  # read nothing from etcd yet
        (40, 5, 42, True),  # elected before this node's last read, not yet seen
        (40, None, 42, True),  # a new run: no term seen yet (the key expired)
        (44, None, 42, False),
    ],
)
def test_an_epoch_far_ahead_of_etcd_is_refused(
    epoch: int, newest: int | None, revision: int, promised: bool
) -> None:
    promises = Promises()
    answer = promises.answer(
        Hold("a", 1, epoch, 2.0),
        100.0,
        ttl=2.0,
        busy=None,
        newest_epoch=newest,
        seen_revision=revision,
    )
    assert bool(answer[0]) is promised, answer
    assert (promises.binding(100.1) is not None) is promised


def test_a_key_or_peers_changed_keep_what_was_taken() -> None:
    """The agent keeps one PeerAuth across peer paths (a new topology, a new key): a
    datagram captured before is still a replay after."""
    a, b = auth(), auth()
    captured = a.seal(Release("a", 8, 12))
    assert b.open(captured) == Release("a", 8, 12)
    b.peers, b.key = frozenset({"a", "c"}), KEY
    assert dropped(b.open(captured), "replayed")
    b.key = bytes(32)
    assert dropped(b.open(a.seal(HOLD)), "bad MAC"), "the new key counts at once"


def test_the_site_file_names_a_key_file_never_a_key() -> None:
    assert Network(peer_key_file="/etc/hapair/peer-p.key").peer_key_file == "/etc/hapair/peer-p.key"
    with pytest.raises(ValidationError, match="this is a key, not the path of its file"):
        Network(peer_key_file="ab" * 32)
    with pytest.raises(ValidationError, match="is not an absolute path"):
        Network(peer_key_file="peer-p.key")


def test_the_agent_loads_the_key_file_or_says_it_runs_in_the_lab_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch = NetWatch(EventLog("test"), lambda: None)
    with caplog.at_level(logging.WARNING):
        assert watch._peer_key(Network()) is None
    assert "peer path in the LAB MODE, NOT AUTHENTICATED" in caplog.text
    assert "network.peer_key_file" in caplog.text
    path = peer_key(tmp_path, "p")
    assert watch._peer_key(Network(peer_key_file=str(path))) == load_peer_key(path)
    path.chmod(0o644)
    with pytest.raises(ProbeError, match="chmod 600"):
        watch._peer_key(Network(peer_key_file=str(path)))


def test_a_sealed_body_of_any_shape_never_raises() -> None:
    """Even with the key (a peer of another version, a bug), opening never raises."""
    good = {"v": 2, "from": "a", "seq": 7, "t": "held", "to": "b", "epoch": 12}
    good |= {"promised": True, "reason": "", "ttl": 2.0, "run": "0" * 16, "born": 1, "n": 1}
    values: list[object] = [None, True, -1, 0, 2**70, 1.5, float("nan"), "x", [], {}]
    b = auth()
    for field in good:
        for value in values:
            body = json.dumps({**good, field: value}).encode()
            result = b.open(hmac.new(KEY, body, hashlib.sha256).hexdigest().encode() + body)
            assert isinstance(result, Message | Dropped), (field, value)
