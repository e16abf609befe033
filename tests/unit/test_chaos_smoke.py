"""The chaos run's schedule comes from its seed alone."""

from __future__ import annotations

import pytest

from tests.chaos.schedule import KINDS, make_schedule, parse_only


def test_schedule_depends_on_the_seed_alone() -> None:
    pairs = {"p": False, "q": True}
    first = make_schedule(42, 60, KINDS, pairs)
    assert [str(f) for f in first] == [str(f) for f in make_schedule(42, 60, KINDS, pairs)]
    assert [str(f) for f in first] != [str(f) for f in make_schedule(43, 60, KINDS, pairs)]
    # Dealt like cards: every kind once in each round of len(KINDS) faults.
    for start in range(0, 60 - len(KINDS) + 1, len(KINDS)):
        assert sorted(f.kind for f in first[start : start + len(KINDS)]) == sorted(KINDS)
    assert all(f.pair == "q" for f in first if f.kind == "pg_crash")
    assert all(f.target == "active" for f in first if f.kind in ("service_kill", "pg_crash"))
    # A longer schedule of the same seed starts with the shorter one: ONLY=I is stable.
    assert [str(f) for f in make_schedule(42, 90, KINDS, pairs)[:60]] == [str(f) for f in first]
    assert parse_only("3,7-9", 10) == [3, 7, 8, 9]
    with pytest.raises(ValueError, match="within 0-9"):
        parse_only("8-10", 10)
