"""RestartBudget: at most ``max_restarts`` restarts in any ``window_s`` seconds (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapair.workshop_agent.restart_budget import RestartBudget


@pytest.mark.parametrize(
    ("max_restarts", "window_s", "times", "expected"),
    [
        pytest.param(3, 60.0, [0, 1, 2, 3], [True, True, True, False], id="fourth-in-window"),
        pytest.param(
            3,
            60.0,
            [0, 1, 2, 59.9, 60, 61, 62],
            [True] * 3 + [False] + [True] * 3,
            id="oldest-leaves-after-a-full-window",
        ),
        pytest.param(
            3,
            60.0,
            [0, 1, 2, 30, 31, 59, 60],
            [True] * 3 + [False] * 3 + [True],
            id="refusals-are-not-counted",
        ),
        pytest.param(
            2,
            10.0,
            [0, 0, 0, 10, 10, 10],
            [True, True, False, True, True, False],
            id="same-instant",
        ),
        pytest.param(
            1, 5.0, [0, 4.999, 5, 9.999, 10], [True, False, True, False, True], id="one-per-window"
        ),
        pytest.param(0, 60.0, [0, 100, 1000], [False] * 3, id="no-restarts-at-all"),
        pytest.param(3, 1.0, [0, 10, 20, 30, 40], [True] * 5, id="sparse-failures"),
        pytest.param(
            2,
            10.0,
            [0, 6, 9, 10, 12, 16],
            [True, True, False, True, False, True],
            id="sliding-not-fixed-windows",
        ),
    ],
)
def test_budget_table(
    max_restarts: int, window_s: float, times: list[float], expected: list[bool]
) -> None:
    budget = RestartBudget(max_restarts, window_s)
    assert [budget.allow(t) for t in times] == expected


def test_a_new_budget_is_full() -> None:
    budget = RestartBudget(3, 60.0)
    assert budget.times == type(budget.times)()
    assert budget.allow(1000.0)
    assert list(budget.times) == [1000.0]


def test_only_the_current_window_is_remembered() -> None:
    budget = RestartBudget(3, 10.0)
    for t in range(100):
        budget.allow(float(t))
    assert len(budget.times) <= 3


@given(
    max_restarts=st.integers(min_value=0, max_value=6),
    window_s=st.floats(min_value=0.01, max_value=100.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=50.0), max_size=60),
)
def test_never_more_than_the_budget_in_any_window(
    max_restarts: int, window_s: float, gaps: list[float]
) -> None:
    budget = RestartBudget(max_restarts, window_s)
    now = 0.0
    allowed: list[float] = []
    for gap in gaps:
        now += gap
        recent = [t for t in allowed if now - t < window_s]
        ok = budget.allow(now)
        if ok:
            allowed.append(now)
            # Safety: counting this one, no more than the budget within window_s.
            assert len(recent) + 1 <= max_restarts
        else:
            # Liveness: a restart is refused only when the budget is really spent.
            assert len(recent) >= max_restarts
    # Whatever span of window_s seconds one looks at, it holds at most max_restarts.
    for start in allowed:
        assert sum(1 for t in allowed if 0 <= t - start < window_s) <= max_restarts
