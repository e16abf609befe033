"""Who may take over a pair with a database: the pure rule."""

from __future__ import annotations

from pathlib import Path

from pg_harness import database_section

from shared.database import DatabaseConfig
from shared.records import SyncState
from workshop_agent.database import eligible

SYNC = DatabaseConfig.model_validate(database_section(Path("/srv"), 5432, synchronous=True))
ASYNC = DatabaseConfig.model_validate(database_section(Path("/srv"), 5432, synchronous=False))


def test_without_a_synchronous_database_anyone_may() -> None:
    assert eligible(None, None, "b", "a")
    assert eligible(ASYNC, SyncState(primary="a"), "b", "a")


def test_a_new_site_waits_for_the_main() -> None:
    assert eligible(SYNC, None, "a", "a")
    assert not eligible(SYNC, None, "b", "a")


def test_only_the_recorded_nodes_hold_every_commit() -> None:
    record = SyncState(primary="a", sync=["b"])
    assert eligible(SYNC, record, "b", "a")
    assert eligible(SYNC, record, "a", "a")
    assert not eligible(SYNC, record, "c", "a")


def test_degraded_primary_alone_may_come_back() -> None:
    record = SyncState(primary="a", sync=[], degraded=True)
    assert eligible(SYNC, record, "a", "a")
    assert not eligible(SYNC, record, "b", "a")


def test_with_a_quorum_only_the_standby_that_received_most_takes_over() -> None:
    record = SyncState(primary="a", sync=["b", "c"])
    received = {"a": None, "b": 1000, "c": 2000}
    assert eligible(SYNC, record, "c", "a", received)
    assert not eligible(SYNC, record, "b", "a", received)
    # Equal positions may both go (the priority delay then picks the preferred one).
    assert eligible(SYNC, record, "b", "a", {"b": 2000, "c": 2000})
    # A standby that does not know its own position defers to one that does.
    assert not eligible(SYNC, record, "b", "a", {"b": None, "c": 5})


def test_with_a_quorum_a_standby_that_does_not_answer_may_hold_what_the_others_lack() -> None:
    """Under ``ANY 1 (b, c)`` a commit may be on b alone: c may take over only once b
    answered and c received at least as much. The pair waits otherwise (an operator may
    force a node), rather than promote a standby that may lack commits."""
    record = SyncState(primary="a", sync=["b", "c"])
    assert not eligible(SYNC, record, "c", "a", {"a": None, "b": None, "c": 2000})
    assert not eligible(SYNC, record, "c", "a", {"a": None, "c": 2000})  # b not even listed
    assert not eligible(SYNC, record, "c", "a", None)
    assert not eligible(SYNC, record, "b", "a", {"b": None, "c": None})
    assert eligible(SYNC, record, "c", "a", {"a": None, "b": 2000, "c": 2000})
    # The recorded primary holds everything whatever the standbys say.
    assert eligible(SYNC, record, "a", "a", {"a": None, "b": None, "c": None})
    three = SyncState(primary="a", sync=["b", "c", "d"])
    assert not eligible(SYNC, three, "b", "a", {"b": 9, "c": 5, "d": None})
    assert eligible(SYNC, three, "b", "a", {"b": 9, "c": 5, "d": 9})
