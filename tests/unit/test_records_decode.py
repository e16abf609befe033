"""Decoding etcd values into records: remembered while the value is unchanged."""

from __future__ import annotations

import pytest

from hapair.shared.records import Leader, RecordError, decode_shared


def test_an_unchanged_value_is_decoded_once() -> None:
    raw = Leader(node="a").encode()
    first = decode_shared(Leader, raw, "k")
    assert decode_shared(Leader, bytes(raw), "k") is first
    assert first.node == "a"


def test_a_new_value_is_decoded_anew() -> None:
    before = decode_shared(Leader, Leader(node="a").encode(), "k")
    after = decode_shared(Leader, Leader(node="b").encode(), "k")
    assert (before.node, after.node) == ("a", "b")


def test_garbage_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(RecordError, match="not JSON"):
            decode_shared(Leader, b"{nope", "k")
