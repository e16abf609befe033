"""The bookkeeping of riding out an etcd loss (hold.py), its wire format, its decision."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from hapair.workshop_agent.decide import Campaign, decide
from hapair.workshop_agent.hold import Ledger, Promises
from hapair.workshop_agent.observation import HandoverView
from hapair.workshop_agent.peer_wire import (
    Dropped,
    Hold,
    HoldReply,
    Message,
    PeerAuth,
    Release,
)
from tests.unit.test_decide import obs

FENCE_AFTER = 1.5
TTL = 2.0
KEY = b"k" * 32


def reply(sender: str, seq: int, epoch: int = 5, promised: bool = True) -> HoldReply:
    if promised:
        return HoldReply(sender, "a", seq, epoch, True, ttl=TTL)
    return HoldReply(sender, "a", seq, epoch, False, "busy")


def test_no_promise_from_every_peer_gives_no_time() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0, TTL)
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == -float("inf")
    assert ledger.answer(reply("b", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == -float("inf"), "c never promised"
    assert ledger.answer(reply("c", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.0 + FENCE_AFTER
    assert ledger.deadline([], FENCE_AFTER) == -float("inf"), "nobody to promise: no hold"


def test_the_oldest_latest_promise_counts_from_its_send() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0, TTL)
    ledger.sent(5, 2, 10.5, TTL)
    ledger.answer(reply("b", 2))
    ledger.answer(reply("c", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.0 + FENCE_AFTER
    assert not ledger.answer(reply("b", 1)), "an older promise never moves the time back"
    ledger.answer(reply("c", 2))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.5 + FENCE_AFTER


def test_refusals_and_strangers_give_nothing() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0, TTL)
    assert not ledger.answer(reply("b", 9)), "a hold never sent"
    assert not ledger.answer(reply("b", 1, epoch=4)), "another term's answer"
    assert ledger.answer(reply("b", 1))
    assert not ledger.answer(reply("b", 1, promised=False))
    assert ledger.refusals == {"b": "busy"}
    assert ledger.deadline(["b"], FENCE_AFTER) == -float("inf"), "a refusal withdraws"


def test_a_new_term_forgets_the_old_promises() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0, TTL)
    ledger.answer(reply("b", 1))
    ledger.sent(6, 2, 11.0, TTL)
    assert ledger.deadline(["b"], FENCE_AFTER) == -float("inf")
    assert not ledger.answer(reply("b", 1, epoch=5))


def test_a_standby_promises_for_the_shorter_ttl_and_keeps_it() -> None:
    promises = Promises()
    ok = promises.answer(
        Hold("a", 1, 5, 3.0), 100.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert ok == (True, "", 2.0)
    binding = promises.binding(101.9)
    assert binding is not None and (binding.node, binding.epoch) == ("a", 5)
    assert promises.binding(102.0) is None, "heard nothing for its own TTL: free again"
    ok = promises.answer(
        Hold("a", 2, 5, 1.0), 102.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert ok == (True, "", 1.0), "a shorter hold asked: promised for that"


def test_a_promise_for_the_lease_is_one_whatever_its_length() -> None:
    """The active asks its peers to hold for the lease its term runs on, granted with the
    TTL it had then; a new TTL that the site gave the pair since, longer, applies to
    this node at once. A hold for the lease is one still, and one that stands in for a
    term's beats (``beating.py``) says so, whatever its length."""
    promises = Promises()
    promises.answer(
        Hold("a", 1, 5, 2.0), 100.0, ttl=3.0, busy=None, newest_epoch=5, seen_revision=5
    )
    lease = promises.binding(100.5, for_lease=True)
    assert lease is not None and lease.node == "a", "a promise for the lease"
    promises = Promises()
    promises.answer(
        Hold("a", 1, 5, 0.3, beat=True), 100.0, ttl=3.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert promises.binding(100.1, for_lease=True) is None, "one for the beats"
    assert promises.binding(100.1) is not None, "which binds all the same"


@pytest.mark.parametrize(
    ("busy", "newest", "why"),
    [
        ("this node is active", 5, "this node is active"),
        ("this node is campaigning", 5, "this node is campaigning"),
        (None, 6, "epoch 5 is stale: epoch 6 was elected since"),
    ],
)
def test_a_standby_refuses_when_it_cannot_keep_the_promise(
    busy: str | None, newest: int, why: str
) -> None:
    promises = Promises()
    answer = promises.answer(
        Hold("a", 1, 5, 2.0),
        100.0,
        ttl=2.0,
        busy=busy,
        newest_epoch=newest,
        seen_revision=newest or 0,
    )
    assert answer == (False, why, 0.0)
    assert promises.binding(100.1) is None


def test_a_handover_of_that_term_releases_the_promise() -> None:
    promises = Promises()
    promises.answer(
        Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert promises.binding(100.5, released=[("a", 4)]) is not None, "an older term's record"
    assert promises.binding(100.5, released=[("a", 5)]) is None


def test_a_release_from_the_former_holder_ends_the_promise() -> None:
    promises = Promises()
    promises.answer(
        Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    promises.release("b", 5)
    promises.release("a", 4)
    assert promises.binding(100.5) is not None, "another node's or an older term's release"
    promises.release("a", 5)
    assert promises.binding(100.5) is None


def test_a_release_leaves_a_promise_given_in_place_of_a_beat_to_run_its_course() -> None:
    """The active may still count that promise after its release: its fence point rests
    on it, not on its last beat in etcd alone. A handover record ends it: its services
    are stopped."""
    promises = Promises()
    for hold, at in ((Hold("a", 1, 5, 2.0), 100.0), (Hold("a", 2, 5, 0.3, beat=True), 100.5)):
        promises.answer(hold, at, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5)
    promises.release("a", 5)
    assert promises.binding(100.6, for_lease=True) is None, "the promise for the lease"
    short = promises.binding(100.6)
    assert short is not None and not short.for_lease and short.until == 100.8
    assert promises.binds("a", 5, 100.6)
    assert promises.binding(100.8) is None, "run out"
    promises.answer(
        Hold("a", 3, 5, 0.3, beat=True), 101.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    assert promises.binding(101.1, released=[("a", 5)]) is None, "a handover record"


def test_a_promise_in_place_of_a_beat_never_shortens_one_for_the_lease() -> None:
    promises = Promises()
    promises.answer(
        Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    promises.answer(
        Hold("a", 2, 5, 0.3, beat=True), 101.9, ttl=2.0, busy=None, newest_epoch=5, seen_revision=5
    )
    lease = promises.binding(101.95, for_lease=True)
    assert lease is not None and lease.until == 102.0


def test_at_a_release_the_active_forgets_the_short_promises_a_peer_does_not_keep() -> None:
    """An agent of the version before ended its short promises at a release too: the
    active stops counting them, and the answers to the holds it sent before the release,
    which may still come. A peer that keeps them goes on counting."""
    ledger = Ledger()
    for seq in (1, 2):
        ledger.sent(5, seq, 100.0 + seq / 10, 0.3)
    ledger.answer(HoldReply("b", "a", 1, 5, True, ttl=0.3, kept=True))
    ledger.answer(HoldReply("c", "a", 1, 5, True, ttl=0.3))
    assert ledger.deadline(["b"], 0.15) == 100.25
    ledger.released()
    assert ledger.deadline(["b"], 0.15) == 100.25, "b keeps its promise"
    assert ledger.deadline(["c"], 0.15) == -float("inf"), "c's ended with the release"
    assert not ledger.asked(2), "an answer to a hold sent before binds c no more"
    ledger.sent(5, 3, 100.5, 0.3)
    ledger.answer(HoldReply("c", "a", 3, 5, True, ttl=0.3))
    assert ledger.deadline(["b", "c"], 0.15) == 100.25


def test_a_promise_in_place_of_a_beat_says_it_is_kept_past_a_release() -> None:
    beat, lease = Hold("a", 1, 5, 0.3, beat=True), Hold("a", 2, 5, 2.0)
    assert HoldReply.answering(beat, "b", True, "", 0.3) == HoldReply(
        "b", "a", 1, 5, True, "", 0.3, True
    )
    assert not HoldReply.answering(lease, "b", True, "", 2.0).kept, "a release ends it"
    assert not HoldReply.answering(beat, "b", False, "this node is active", 0.0).kept


def sealed(body: dict[str, object]) -> bytes:
    """``body`` as a peer with the key would send it, whatever it holds."""
    data = json.dumps({**body, "run": "0" * 16, "born": 1, "n": 1}).encode()
    return hmac.new(KEY, data, hashlib.sha256).hexdigest().encode() + data


def opened(data: bytes) -> Message | Dropped:
    return PeerAuth(KEY, ["a", "b"]).open(data)


def test_wire_format_round_trip_and_garbage() -> None:
    hold = Hold("a", 7, 12, 2.0)
    answer = HoldReply("b", "a", 7, 12, False, "this node is active")
    for msg in (hold, answer, Release("a", 8, 12)):
        assert opened(PeerAuth(KEY, []).seal(msg)) == msg
    good = {"v": 2, "from": "a", "seq": 7, "t": "hold", "epoch": 12, "ttl": 2.0}
    assert opened(sealed(good)) == hold
    # A hold for a term's beats says so; one for the lease is encoded as it always was,
    # and a peer that knows no such field reads it as a hold like any other.
    assert b'"beat"' not in PeerAuth(KEY, []).seal(hold)
    beat = Hold("a", 7, 12, 0.3, beat=True)
    assert opened(PeerAuth(KEY, []).seal(beat)) == beat
    assert opened(sealed({**good, "beat": True})) == Hold("a", 7, 12, 2.0, beat=True)
    assert isinstance(opened(sealed({**good, "beat": 1})), Dropped)
    assert isinstance(opened(sealed({**good, "t": "release", "epoch": -1})), Dropped)
    for bad in (
        {"epoch": True},
        {"epoch": 0},
        {"epoch": "12"},
        {"ttl": 0},
        {"ttl": True},
        {"ttl": 1e9},
        {"t": "hold?"},
        {"v": 1},
    ):
        assert isinstance(opened(sealed({**good, **bad})), Dropped), bad
    held = {**good, "t": "held", "to": "a", "from": "b", "promised": True, "reason": ""}
    assert opened(sealed(held)) == HoldReply("b", "a", 7, 12, True, "", 2.0)
    # A promise kept past a release says so; an older peer's reply, without the field,
    # reads as one that is not.
    kept = HoldReply("b", "a", 7, 12, True, "", 0.3, kept=True)
    assert opened(PeerAuth(KEY, []).seal(kept)) == kept
    assert b'"kept"' not in PeerAuth(KEY, []).seal(HoldReply("b", "a", 7, 12, True, "", 0.3))
    assert opened(sealed({**held, "kept": True})) == HoldReply("b", "a", 7, 12, True, "", 2.0, True)
    for bad in (
        {"kept": 1},
        {"kept": None},
        {"promised": 1},
        {"reason": None},
        {"to": "not a name!"},
        {"ttl": -1},
        {"ttl": None},
    ):
        assert isinstance(opened(sealed({**held, **bad})), Dropped), bad


def test_a_node_that_promised_does_not_campaign() -> None:
    assert [type(a) for a in decide(obs("b")).actions] == [Campaign]
    decision = decide(obs("b", held_by="a (epoch 5)"))
    assert decision.actions == ()
    assert "a (epoch 5) holds the pair over the peer path" in decision.reason


def test_a_restarted_node_waits_out_the_promises_its_previous_run_may_have_given() -> None:
    waiting = decide(obs("a", forgotten_promises_until=100.5))
    assert waiting.actions == ()
    assert "previous run of this agent may have given" in waiting.reason
    assert [type(a) for a in decide(obs("a", forgotten_promises_until=100.0)).actions] == [Campaign]
    to_me = HandoverView("a", "b", 9, seen_at=99.9)
    handed = decide(obs("a", forgotten_promises_until=100.5, handover=to_me))
    assert [type(a) for a in handed.actions] == [Campaign], "a handover is not delayed"
