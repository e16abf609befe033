"""What a won campaign is called, in the log and in the election event: a table."""

from __future__ import annotations

import pytest

from hapair.workshop_agent.decide import NEW_TERM_BEAT, takeover_cause
from hapair.workshop_agent.observation import HandoverView


def handover(to: str, from_node: str, planned: bool = True) -> HandoverView:
    return HandoverView(to, from_node, 40, 99.0, planned=planned)


@pytest.mark.parametrize(
    ("case", "previous", "record", "forced", "cause"),
    [
        ("first term ever", None, None, None, "election"),
        ("own last term", "a", None, None, "election"),
        ("the active gone", "b", None, None, "failover from b"),
        ("planned handover to this node", "b", handover("a", "b"), None, "planned switchover"),
        (
            "unplanned handover to this node",
            "b",
            handover("a", "b", planned=False),
            None,
            "switch forced by b",
        ),
        (
            "its own handover record, after an agent restart",
            "a",
            handover("a", "a"),
            None,
            "took its pair back after an agent restart",
        ),
        (
            "its own handover record, for the pair's new term beat",
            "a",
            HandoverView("a", "a", 40, 99.0, request=NEW_TERM_BEAT),
            None,
            "a new term for the pair's new term beat",
        ),
        (
            "forced by an operator",
            "b",
            None,
            "a",
            "takeover forced by an operator (failover from b)",
        ),
        (
            "forced, never saw an active",
            None,
            None,
            "a",
            "takeover forced by an operator (failover from None)",
        ),
        (
            "forced, with a planned handover to this node: planned wins",
            "b",
            handover("a", "b"),
            "a",
            "planned switchover",
        ),
        (
            "forced, with an unplanned handover to this node: forced wins",
            "b",
            handover("a", "b", planned=False),
            "a",
            "takeover forced by an operator (failover from b)",
        ),
        ("another node forced", "b", None, "c", "failover from b"),
        ("a handover to another node", "b", handover("c", "b"), None, "failover from b"),
        (
            "a handover to another node, none seen active",
            None,
            handover("c", "b"),
            None,
            "election",
        ),
    ],
)
def test_takeover_cause(
    case: str, previous: str | None, record: HandoverView | None, forced: str | None, cause: str
) -> None:
    assert takeover_cause("a", previous, record, forced) == cause, case
