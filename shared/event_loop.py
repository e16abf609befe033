"""Running a daemon's main coroutine on uvloop when it is installed.

uvloop roughly halves the per-request cost of the registry, the proxy and the comm
server; without it they run on asyncio's own loop, unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from hapair.shared.log import EventLog

T = TypeVar("T")
log = EventLog("hapair.loop")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    # Outside the try: an ImportError raised by the daemon itself is not uvloop missing.
    return uvloop.run(_on_uvloop(main))


async def _on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    asyncio.get_running_loop().set_exception_handler(exception_handler)
    return await main


def exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's default handler (a logged error with its traceback), except for
    :func:`written_after_close`, which is logged at debug level only."""
    if written_after_close(context):
        log.debug(
            "tls connection already closed",
            message=context.get("message"),
            error=str(context.get("exception")),
        )
        return
    loop.default_exception_handler(context)


def written_after_close(context: dict[str, Any]) -> bool:
    """uvloop's TLS protocol writing to a TCP connection closed under it.

    When a TLS connection's socket fails (the peer reset it) or is closed while the TLS
    layer still counts it open, uvloop only schedules telling the TLS layer so (the
    defect MagicStack/uvloop pull request 639 describes; not in uvloop 0.23): a read
    already scheduled runs first, answers the peer on the closed socket and reports the
    RuntimeError as a fatal error of the connection, with a traceback. The connection was
    going anyway and nothing else depends on it: only this exact report is quieted."""
    err = context.get("exception")
    return (
        context.get("message") == "Fatal error on SSL protocol"
        and isinstance(err, RuntimeError)
        and str(err).startswith("unable to perform operation on <TCPTransport closed=True")
        and str(err).endswith("the handler is closed")
    )
