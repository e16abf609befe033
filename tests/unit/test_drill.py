"""``hapair drill``: figures from samples, and its refusals, without a site."""

from __future__ import annotations

import os

import pytest

from hapair.registry.console.drill_faults import FaultError, local_agent
from hapair.registry.console.drill_measure import Sample, figures
from hapair.shared.records import NodeStatus, local_boot_id


def _s(at: float, ok: bool, epoch: int = 5) -> Sample:
    return Sample(at, ok, epoch, "a" if epoch == 5 else "b")


@pytest.mark.parametrize(
    ("samples", "outage", "takeover_at"),
    [
        ([_s(0.9, True), _s(1.0, True), _s(1.1, True)], 0.0, None),
        ([_s(0.9, True), _s(1.1, False), _s(1.5, False), _s(2.0, True, 9)], 0.9, 2.0),
        ([_s(1.1, False), _s(1.3, True), _s(1.4, False), _s(1.6, True, 9)], 0.2, 1.6),
        ([_s(1.1, False), _s(1.2, False)], 0.1, None),
    ],
)
def test_outage_and_takeover_from_samples(
    samples: list[Sample], outage: float, takeover_at: float | None
) -> None:
    fig = figures(samples, t0=1.0, old_epoch=5)
    assert fig.outage_s == pytest.approx(outage)
    assert (fig.takeover.at if fig.takeover else None) == takeover_at


def test_refuses_an_agent_that_is_not_on_this_machine() -> None:
    elsewhere = NodeStatus(node="a", pair="p", address="10.0.0.1", role="active", pid=os.getpid())
    with pytest.raises(FaultError, match="cannot tell"):
        local_agent(elsewhere)
    other = elsewhere.model_copy(update={"boot_id": "not-this-boot"})
    with pytest.raises(FaultError, match=r"another machine.*--fault switchover"):
        local_agent(other)
    here = elsewhere.model_copy(update={"boot_id": local_boot_id()})
    with pytest.raises(FaultError, match="not the hapair agent of a"):
        local_agent(here)  # this test process is no agent
