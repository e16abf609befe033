"""The agent's real-time scheduling setting, and what it says when the kernel refuses."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from hapair.shared.log import EventLog
from hapair.workshop_agent import main, priority
from hapair.workshop_agent.settings import AgentSettings


def test_on_by_default_and_bounded_below_the_watchdog_s() -> None:
    assert AgentSettings(node="a").realtime_priority == priority.DEFAULT
    assert AgentSettings(node="a", realtime_priority=0).realtime_priority == 0
    for bad in (-1, 99):  # the watchdog runs one above: 99 is the kernel's own
        with pytest.raises(ValidationError, match="realtime_priority"):
            AgentSettings(node="a", realtime_priority=bad)


def test_a_refusal_is_said_and_the_agent_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(priority, "take", lambda level, pid=0: "Operation not permitted")
    with caplog.at_level(logging.INFO):
        main.realtime(10, EventLog("hapair.agent", node="a"))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "real-time scheduling refused" in record.getMessage()
    assert record.fields["reason"] == "Operation not permitted"  # type: ignore[attr-defined]
