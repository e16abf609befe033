"""What a forced takeover of a node not acknowledged as a member says it risks."""

from __future__ import annotations

import pytest

from hapair.shared import records
from hapair.shared.admin import TakeoverRisk

pytestmark = pytest.mark.e2e


def test_a_forced_takeover_of_a_node_not_acknowledged_says_what_it_risks() -> None:
    """An operator may force such a node (the agents let the forced node campaign): the
    warning says that a cut-off active may still run the pair's services."""
    risk = TakeoverRisk("p", "c", None, frozenset({"a", "b"}))
    warning = risk.warning()
    assert warning is not None and warning.startswith(
        "c is not yet acknowledged as a member of pair p by its last active (acknowledged: a, b)"
    )
    assert "would run them together with c" in warning
    assert TakeoverRisk("p", "c", None, frozenset({"a", "b", "c"})).warning() is None
    assert TakeoverRisk("p", "c", None, None).warning() is None  # no member set yet
    lagging = records.SyncState(primary="a", sync=[], degraded=True, epoch=1)
    both = TakeoverRisk("p", "c", lagging, frozenset({"a"})).warning()
    assert both is not None and "acknowledged commit" in both and "member" in both
