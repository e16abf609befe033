"""The site for ``hapair top``, from the first registry that answers, and its admin routes.

:class:`SiteFeed` follows one registry at a time with
:meth:`hapair.registry.console.sources.RegistrySource.follow`: the site is read again on
every event of the registry's stream (and every ``tick_s``, for what the stream does not carry, such
as restart counts). A report with a warning, or no report, means that registry can no
longer vouch for the present (it went away, or it lost etcd): the feed then says so at
once, keeping the last current report and when it was read, and moves on to the next
registry, going round the list until one answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from ssl import SSLContext
from typing import Any, Literal, cast

import aiohttp

from hapair.registry.console.sources import RegistrySource, SourceError
from hapair.registry.console.top.state import Connection
from hapair.shared.clock import Clock
from hapair.shared.report import SiteReport

Sleep = Callable[[float], Awaitable[None]]


def split_urls(urls: str) -> list[str]:
    """``URL[,URL...]`` as a list, without blanks or trailing slashes."""
    return [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]


@dataclass(frozen=True, slots=True)
class Request:
    """An admin request the operator confirmed."""

    action: Literal["ack", "switchover"]
    pair: str
    body: dict[str, Any]

    @property
    def path(self) -> str:
        return f"/v1/pairs/{self.pair}/{self.action}"


class SiteFeed:
    """The site as (last current report, connection) pairs, on every change."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        tick_s: float = 1.0,
        timeout_s: float = 2.0,
        retry_s: float = 1.0,
        token: str | None = None,
        ssl: SSLContext | None = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not urls:
            raise ValueError("no registry URL")
        self.urls = list(urls)
        self.tick_s = tick_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.token = token
        self.ssl = ssl
        """How https:// registries are checked, and the operator's certificate shown."""
        self.clock = clock
        self.sleep = sleep
        self.index = 0
        """The registry followed now, or tried last."""

    @property
    def url(self) -> str:
        return self.urls[self.index]

    async def follow(self) -> AsyncGenerator[tuple[SiteReport | None, Connection], None]:
        """Yields whenever the report or the connection changes (and every ``tick_s``
        while live). Never ends by itself; never raises for an unreachable registry."""
        last: SiteReport | None = None
        conn = Connection(url=self.url)
        failed = 0  # registries in a row that gave nothing current
        while True:
            url = self.url
            problem = ""
            try:
                source = RegistrySource(url, self.timeout_s, ssl=self.ssl)
                # follow() is an async generator: close it (and its stream) on leaving.
                follow = cast(AsyncGenerator[SiteReport, None], source.follow(self.tick_s))
                async with contextlib.aclosing(follow) as reports:
                    async for report in reports:
                        if report.warning:
                            problem = report.warning
                            break
                        failed = 0
                        now = self.clock()
                        last = report
                        if conn.live and conn.url == url:
                            conn = replace(conn, read_at=now)
                        else:
                            conn = Connection(url=url, live=True, since=now, read_at=now)
                        yield last, conn
            except SourceError as err:
                problem = str(err)
            # Lost, or never reached: say so before trying the next one.
            since = self.clock() if conn.live or conn.since is None else conn.since
            conn = Connection(url=url, live=False, since=since, error=problem, read_at=conn.read_at)
            yield last, conn
            failed += 1
            self.index = (self.index + 1) % len(self.urls)
            if failed >= len(self.urls):
                failed = 0
                await self.sleep(self.retry_s)

    async def send(self, request: Request) -> tuple[bool, str]:
        """POST ``request`` to the registry in use, else to the others; (ok, what
        happened, in a sentence)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s + 3.0)
        order = self.urls[self.index :] + self.urls[: self.index]
        errors: list[str] = []
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            for url in order:
                try:
                    async with session.post(
                        url + request.path, json=request.body, ssl=self.ssl or True
                    ) as resp:
                        status, raw = resp.status, await resp.read()
                except (aiohttp.ClientError, TimeoutError) as err:
                    errors.append(f"{url}: {err or type(err).__name__}")
                    continue
                return outcome(request, status, raw)
        return False, f"{request.action} of {request.pair} not sent: " + "; ".join(errors)


def outcome(request: Request, status: int, raw: bytes) -> tuple[bool, str]:
    """A registry's answer to ``request`` as (ok, sentence)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if request.action == "ack" and status == 200:
        rec = data.get("recovery") or {}
        held = ", ".join(rec.get("held") or []) or "no service"
        return True, (
            f"recovery of {request.pair} at epoch {rec.get('epoch')} acknowledged: "
            f"{held} starting on {rec.get('to_node')}"
        )
    if request.action == "switchover" and status == 202:
        return True, (
            f"switchover of {request.pair} to {data.get('to') or 'the first ready standby'} "
            f"requested (request {data.get('request')}); the active carries it out"
        )
    error = data.get("error") or raw.decode(errors="replace")[:200]
    return False, f"{request.action} of {request.pair} refused (HTTP {status}): {error}"
