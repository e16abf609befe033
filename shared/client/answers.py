"""A registry's answers: read within a size limit, checked, and taken into what the
resolver knows of a service (``resolver.py`` asks and follows; this module judges).

Knowledge never goes back: an answer older than what is known (by epoch, then by the
etcd revision that published the endpoint) raises :class:`Behind`, and changes nothing;
an answer that is not a valid one raises :class:`Garbage`; one its registry marks as
possibly behind etcd raises :class:`RegistryDown`. The resolver then asks another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
from pydantic import ValidationError

from hapair.shared.client.errors import describe_error
from hapair.shared.client.models import Endpoint, EndpointAnswer, ErrorAnswer
from hapair.shared.log import EventLog

MAX_ANSWER_BYTES = 64 * 1024

log = EventLog("hapair.client")


class Garbage(Exception):
    """A registry answered something that is not a valid answer."""


class RegistryDown(Exception):
    """A registry answered, but says it cannot vouch for what it knows (lost etcd)."""


class Behind(Exception):
    """A registry answered something older than what is known: it lags behind etcd."""


class Entry:
    """One service's knowledge; ``changed`` is set (and replaced) on every change."""

    __slots__ = ("changed", "down_as_of", "endpoint", "reason", "stale", "status", "unconfirmed")

    def __init__(self) -> None:
        self.endpoint: Endpoint | None = None
        self.status: int | None = None
        self.reason = ""
        self.stale = False
        self.down_as_of = 0
        """With status 503: the etcd revision as of which there was no valid endpoint."""
        self.unconfirmed = False
        """Learnt from another registry than the one followed, which has not said it."""
        self.changed = asyncio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def update(self, status: int, reason: str) -> bool:
        if (self.status, self.reason, self.stale) == (status, reason, False):
            return False
        self.status, self.reason, self.stale = status, reason, False
        return True


def accept(entry: Entry, service: str, status: int, payload: Any) -> bool:
    """Take a registry's answer for ``service`` into its entry, or raise (and change
    nothing): :class:`Garbage`, :class:`Behind` for an answer older than what is
    known, :class:`RegistryDown` for one its registry marks stale. Whether the
    answer was news."""
    if status == 200:
        try:
            answer = EndpointAnswer.model_validate(payload)
        except ValidationError as err:
            raise Garbage(f"invalid endpoint: {describe_problem(err)}") from None
        new = answer.endpoint()
        if new.service != service:
            raise Garbage(f"asked for {service!r}, got an endpoint of {new.service!r}")
        if answer.stale:
            raise RegistryDown("the registry says its answers may be behind etcd")
        old = entry.endpoint
        if old is not None and old.newer_than(new):
            raise Behind(f"{service}: {_position(new)} is older than {_position(old)}")
        if entry.status == 503 and new.revision < entry.down_as_of:
            raise Behind(
                f"{service}: {_position(new)} is older than its end, seen as of "
                f"revision {entry.down_as_of}"
            )
        moved = new.newer_than(old)
        if moved:
            entry.endpoint = new
            log.info("endpoint", service=service, node=new.node, at=new.address, epoch=new.epoch)
        entry.down_as_of = 0
        news = entry.update(200, "") or moved
    elif status in (404, 503):
        try:
            error = ErrorAnswer.model_validate(payload)
        except ValidationError as err:
            raise Garbage(f"HTTP {status} without a reason: {describe_problem(err)}") from None
        if error.stale:
            raise RegistryDown("the registry says its answers may be behind etcd")
        old = entry.endpoint
        if status == 503 and old is not None and error.revision < old.revision:
            raise Behind(
                f"{service}: no endpoint as of revision {error.revision}, older than "
                f"{_position(old)}"
            )
        if status == 503:
            entry.down_as_of = max(entry.down_as_of, error.revision)
        news = entry.status != status
        if entry.update(status, error.error):
            if status == 404:
                log.warning("the registry does not know this service", service=service)
            entry.notify()
    else:
        raise Garbage(f"HTTP {status}")
    if status == 200 and news:
        entry.notify()
    return news


def _position(endpoint: Endpoint) -> str:
    return f"epoch {endpoint.epoch} (revision {endpoint.revision})"


def poll_after(entry: Entry) -> int:
    """The epoch to long-poll after: the one in use, or one less while the service is
    down, so that its return under the same epoch (a restart in place) also answers."""
    epoch = entry.endpoint.epoch if entry.endpoint is not None else 0
    return epoch if entry.status == 200 else max(epoch - 1, 0)


async def read_body(resp: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(16384):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise Garbage(f"answer larger than {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


async def error_reason(resp: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(Garbage, ValueError, ValidationError):
        return ErrorAnswer.model_validate(json.loads(await read_body(resp))).error
    return f"HTTP {resp.status}"


def describe_problem(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        return f"{where}: {first['msg']}"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, (Garbage, RegistryDown, Behind)):
        return str(err)
    return describe_error(err)
