"""Log lines: one event per line, an unexpected error with its traceback."""

from __future__ import annotations

import logging

import pytest

from hapair.shared.log import EventLog, LogfmtFormatter


def _boom() -> None:
    raise ValueError("bad value")


def test_an_unexpected_error_is_one_line_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = EventLog("hapair.test", pair="p", node="a")
    try:
        _boom()
    except ValueError as err:
        with caplog.at_level(logging.ERROR, logger="hapair.test"):
            log.exception("round failed", err, step="publish")
    (record,) = caplog.records
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    assert 'event="round failed"' in line
    assert "pair=p node=a step=publish" in line
    assert "error=\"ValueError('bad value')\"" in line
    assert "in _boom" in line and "exc=" in line  # where it was raised, not only what
