"""Operator operations: the warnings of a forced takeover, worked out without etcd."""

from __future__ import annotations

from hapair.shared import admin, records


def test_forcing_one_of_several_quorum_standbys_warns_that_the_others_may_hold_more() -> None:
    """Under quorum commit a commit may be on one recorded standby alone: forcing another
    one may lose it, although that node is recorded."""
    quorum = records.SyncState(primary="a", sync=["b", "c"], epoch=7)
    risk = admin.TakeoverRisk("p", "c", quorum)
    assert risk.may_lose_commits
    warning = risk.warning()
    assert warning is not None and "acknowledged by b alone is missing on c" in warning
    # The primary itself, and the one recorded standby of a pair of two, risk nothing.
    assert admin.TakeoverRisk("p", "a", quorum).warning() is None
    single = records.SyncState(primary="a", sync=["b"], epoch=7)
    assert admin.TakeoverRisk("p", "b", single).warning() is None
    assert admin.TakeoverRisk("p", "c", single).may_lose_commits
