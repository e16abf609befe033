"""The bookkeeping of riding out an etcd loss (hold.py), its wire format, its decision."""

from __future__ import annotations

import json

import pytest

from hapair.workshop_agent.decide import Campaign, decide
from hapair.workshop_agent.hold import Ledger, Promises
from hapair.workshop_agent.observation import HandoverView
from hapair.workshop_agent.peer_wire import Hold, HoldReply, Release, decode, encode
from tests.unit.test_decide import obs

FENCE_AFTER = 1.5


def reply(sender: str, seq: int, epoch: int = 5, promised: bool = True) -> HoldReply:
    return HoldReply(sender, "a", seq, epoch, promised, "" if promised else "busy")


def test_no_promise_from_every_peer_gives_no_time() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0)
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == -float("inf")
    assert ledger.answer(reply("b", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == -float("inf"), "c never promised"
    assert ledger.answer(reply("c", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.0 + FENCE_AFTER
    assert ledger.deadline([], FENCE_AFTER) == -float("inf"), "nobody to promise: no hold"


def test_the_oldest_latest_promise_counts_from_its_send() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0)
    ledger.sent(5, 2, 10.5)
    ledger.answer(reply("b", 2))
    ledger.answer(reply("c", 1))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.0 + FENCE_AFTER
    assert not ledger.answer(reply("b", 1)), "an older promise never moves the time back"
    ledger.answer(reply("c", 2))
    assert ledger.deadline(["b", "c"], FENCE_AFTER) == 10.5 + FENCE_AFTER


def test_refusals_and_strangers_give_nothing() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0)
    assert not ledger.answer(reply("b", 9)), "a hold never sent"
    assert not ledger.answer(reply("b", 1, epoch=4)), "another term's answer"
    assert ledger.answer(reply("b", 1))
    assert not ledger.answer(reply("b", 1, promised=False))
    assert ledger.refusals == {"b": "busy"}
    assert ledger.deadline(["b"], FENCE_AFTER) == -float("inf"), "a refusal withdraws"


def test_a_new_term_forgets_the_old_promises() -> None:
    ledger = Ledger()
    ledger.sent(5, 1, 10.0)
    ledger.answer(reply("b", 1))
    ledger.sent(6, 2, 11.0)
    assert ledger.deadline(["b"], FENCE_AFTER) == -float("inf")
    assert not ledger.answer(reply("b", 1, epoch=5))


def test_a_standby_promises_for_the_longer_ttl_and_keeps_it() -> None:
    promises = Promises()
    ok = promises.answer(Hold("a", 1, 5, 3.0), 100.0, ttl=2.0, busy=None, newest_epoch=5)
    assert ok == (True, "")
    binding = promises.binding(102.9)
    assert binding is not None and (binding.node, binding.epoch) == ("a", 5)
    assert promises.binding(103.0) is None, "heard nothing for the TTL: free again"


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
    answer = promises.answer(Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=busy, newest_epoch=newest)
    assert answer == (False, why)
    assert promises.binding(100.1) is None


def test_a_handover_of_that_term_releases_the_promise() -> None:
    promises = Promises()
    promises.answer(Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=None, newest_epoch=None)
    assert promises.binding(100.5, released=[("a", 4)]) is not None, "an older term's record"
    assert promises.binding(100.5, released=[("a", 5)]) is None


def test_a_release_from_the_former_holder_ends_the_promise() -> None:
    promises = Promises()
    promises.answer(Hold("a", 1, 5, 2.0), 100.0, ttl=2.0, busy=None, newest_epoch=None)
    promises.release("b", 5)
    promises.release("a", 4)
    assert promises.binding(100.5) is not None, "another node's or an older term's release"
    promises.release("a", 5)
    assert promises.binding(100.5) is None


def test_wire_format_round_trip_and_garbage() -> None:
    hold = Hold("a", 7, 12, 2.0)
    answer = HoldReply("b", "a", 7, 12, False, "this node is active")
    assert decode(encode(hold)) == hold
    assert decode(encode(answer)) == answer
    assert decode(encode(Release("a", 8, 12))) == Release("a", 8, 12)
    assert (
        decode(json.dumps({**json.loads(encode(Release("a", 8, 12))), "epoch": -1}).encode())
        is None
    )
    good = json.loads(encode(hold))
    for bad in (
        {"epoch": True},
        {"epoch": 0},
        {"epoch": "12"},
        {"ttl": 0},
        {"ttl": True},
        {"ttl": 1e9},
        {"t": "hold?"},
    ):
        assert decode(json.dumps({**good, **bad}).encode()) is None, bad
    held = json.loads(encode(answer))
    for bad in ({"promised": 1}, {"reason": None}, {"to": "not a name!"}):
        assert decode(json.dumps({**held, **bad}).encode()) is None, bad


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
