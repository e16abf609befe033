"""The daemons' event loop: uvloop's report of a TLS write on a closed connection is
quieted, every other report goes to the loop's default handler."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from hapair.shared import event_loop

# What uvloop 0.23 hands the loop's exception handler when a scheduled TLS read answers
# on a TCP transport closed under it (SSLProtocol._do_read -> _process_outgoing).
CLOSED_UNDER_TLS = {
    "message": "Fatal error on SSL protocol",
    "exception": RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False "
        "0x55692a8a9ed0>; the handler is closed"
    ),
}


class Loop:
    def __init__(self) -> None:
        self.defaulted: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.defaulted.append(context)


def handle(context: dict[str, Any]) -> Loop:
    loop = Loop()
    event_loop.exception_handler(loop, context)  # type: ignore[arg-type]  # only its default handler is used
    return loop


def test_a_tls_write_on_a_connection_closed_under_it_is_logged_at_debug_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="hapair.loop"):
        loop = handle(CLOSED_UNDER_TLS)
    assert loop.defaulted == []
    [record] = caplog.records
    assert record.levelno == logging.DEBUG
    assert "the handler is closed" in record.fields["error"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "context",
    [
        # The same error outside uvloop's TLS protocol is a defect of ours.
        {**CLOSED_UNDER_TLS, "message": "Exception in callback Proxy._moved"},
        # Another failure of the TLS protocol.
        {**CLOSED_UNDER_TLS, "exception": RuntimeError("something else went wrong")},
        {**CLOSED_UNDER_TLS, "exception": ValueError(CLOSED_UNDER_TLS["exception"])},
        {"message": "Task exception was never retrieved"},
    ],
)
def test_every_other_report_goes_to_the_default_handler(context: dict[str, Any]) -> None:
    assert handle(context).defaulted == [context]


def test_the_daemons_loop_uses_the_handler() -> None:
    async def installed() -> object:
        return asyncio.get_running_loop().get_exception_handler()

    pytest.importorskip("uvloop")
    assert event_loop.run(installed()) is event_loop.exception_handler
