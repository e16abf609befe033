"""The relay's long link (``etcd_relay.Lag``): each chunk one way's delay plus jitter
after it came, never before the chunk before it on its connection."""

from __future__ import annotations

import random

import pytest

from tests.support.etcd_relay import Lag


def test_a_chunk_is_due_one_way_plus_jitter_after_it_came() -> None:
    lag = Lag(0.05, 0.01, random.Random(1))
    for arrival in (0.0, 1.0, 2.5):
        due = lag.due(-1.0, arrival)
        assert arrival + 0.04 <= due <= arrival + 0.06


def test_a_chunk_never_overtakes_the_one_before_it() -> None:
    """Two chunks 1 ms apart: the second drew less jitter, yet comes after the first."""
    lag = Lag(0.05, 0.01, random.Random(7))
    due = 0.0
    dues = []
    for i in range(200):
        due = lag.due(due, i * 0.001)
        dues.append(due)
    assert dues == sorted(dues)
    # Jitter did draw less for some later chunk: the order is the rule's doing.
    fresh = Lag(0.05, 0.01, random.Random(7))
    drawn = [fresh.due(-1.0, i * 0.001) for i in range(200)]
    assert drawn != sorted(drawn)
    assert all(d >= r for d, r in zip(dues, drawn, strict=True))


def test_the_same_seed_draws_the_same_delays() -> None:
    def run(seed: int) -> list[float]:
        lag = Lag(0.05, 0.01, random.Random(seed))
        return [lag.due(0.0, t) for t in (0.1, 0.2, 0.3)]

    assert run(3) == run(3) != run(4)


def test_no_delay_delivers_at_once_in_order() -> None:
    lag = Lag()
    assert lag.due(0.0, 1.0) == 1.0
    assert lag.due(2.0, 1.0) == 2.0


def test_jitter_larger_than_the_delay_is_refused() -> None:
    with pytest.raises(AssertionError, match="before arrival"):
        Lag(0.01, 0.02)
