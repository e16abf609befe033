"""Downloads of package files: ``https://`` (the site CA), ``http://`` and ``file://``.

Bounded in size and time, resumed where a partial file was left (an HTTP ``Range``
request), tried again with a growing back-off, and at most one at a time per origin on
a node, so that a workshop's link is never flooded by one agent. The file is written
beside the node's packages and checked by the caller (sha256) before it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from hapair.shared.log import EventLog
from hapair.workshop_agent.package_archive import no_space

if TYPE_CHECKING:
    # Loaded on the first http(s) download: an agent whose packages come from file://
    # (or that has none) has no use for aiohttp (about 11 MiB of its memory).
    import aiohttp

READ = 1 << 20
# Given the DER certificate the server showed (None: none), a reason to refuse it, or
# None to go on; asked before a byte of the body is read.
Accept = Callable[[bytes | None], str | None]
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 << 30
    """Largest package file, and largest unpacked package, accepted."""
    total_s: float = 3600.0
    """One download, retries and back-off included."""
    read_s: float = 60.0
    """Longest silence of a server (connect, or between two reads)."""
    attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


class FetchError(Exception):
    """The file could not be fetched; ``transient``: trying again may help, and the
    partial file is kept to resume from."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.transient = transient


def origin(url: str) -> str:
    """What one download at a time is counted per: a server, or this node's files."""
    parts = urlsplit(url)
    return "file://" if parts.scheme == "file" else f"{parts.scheme}://{parts.netloc.lower()}"


def backoff(attempt: int, limits: Limits) -> float:
    """Seconds before try ``attempt + 1`` (``attempt`` from 1)."""
    return float(min(limits.backoff_s * 2 ** (attempt - 1), limits.backoff_max_s))


def _local(err: OSError, where: Path) -> FetchError:
    if no_space(err):
        return FetchError(f"no space left on device for {where}", transient=False)
    return FetchError(f"cannot write {where}: {err.strerror or err}", transient=False)


class Fetcher:
    """``ssl``: the context for ``https://`` (None: the system's CAs); ``local_host``:
    the address connections are made from (None: the system's choice)."""

    def __init__(
        self,
        log: EventLog,
        ssl: ssl.SSLContext | None,
        limits: Limits,
        local_host: str | None = None,
    ) -> None:
        self.log = log
        self.ssl = ssl
        self.limits = limits
        self.local_host = local_host
        self._origins: dict[str, asyncio.Lock] = {}
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def fetch(self, url: str, dest: Path, accept: Accept | None = None) -> None:
        """``url`` into ``dest`` (resumed if it holds a part); FetchError says why not.
        ``accept`` judges the server by its certificate, when its context does not."""
        lock = self._origins.setdefault(origin(url), asyncio.Lock())
        limits = self.limits
        try:
            # The time bound starts once this download's turn on its origin has come.
            async with lock, asyncio.timeout(limits.total_s):
                attempt = 1
                while True:
                    try:
                        await self._once(url, dest, accept)
                        return
                    except FetchError as err:
                        if not err.transient or attempt >= limits.attempts:
                            raise
                        wait = backoff(attempt, limits)
                        self.log.info(
                            "package download failed; trying again",
                            url=url,
                            reason=str(err),
                            attempt=attempt,
                            after_s=wait,
                        )
                    attempt += 1
                    await asyncio.sleep(wait)
        except TimeoutError:
            raise FetchError(f"not done within {limits.total_s:g}s", transient=True) from None

    async def _once(self, url: str, dest: Path, accept: Accept | None) -> None:
        if urlsplit(url).scheme == "file":
            await asyncio.to_thread(self._copy, Path(unquote(urlsplit(url).path)), dest)
        else:
            await self._http_get(url, dest, accept)

    def _copy(self, source: Path, dest: Path) -> None:
        """A local (or mounted) file, copied whole: the copy is what gets checked."""
        try:
            size = source.stat().st_size
            src = source.open("rb")
        except OSError as err:
            # A shared drive may be back soon; a file that is not there, likewise.
            raise FetchError(f"cannot read {source}: {err.strerror or err}", True) from None
        with src:
            if size > self.limits.max_bytes:
                raise FetchError(
                    f"{source} is {size} bytes, more than the limit of {self.limits.max_bytes}",
                    transient=False,
                )
            try:
                with dest.open("wb") as out:
                    shutil.copyfileobj(src, out, READ)
            except OSError as err:
                raise _local(err, dest) from None

    def _session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.limits.read_s, sock_read=self.limits.read_s
                ),
                # Every server's certificate checked against the site CA (or the system's).
                connector=aiohttp.TCPConnector(
                    ssl=self.ssl if self.ssl is not None else True,
                    local_addr=None if self.local_host is None else (self.local_host, 0),
                ),
                auto_decompress=False,
            )
        return self._http

    async def _http_get(self, url: str, dest: Path, accept: Accept | None) -> None:
        import aiohttp

        have = await asyncio.to_thread(_size, dest)
        headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {}
        try:
            async with self._session().get(url, headers=headers) as resp:
                if accept is not None:
                    refused = accept(_server_certificate(resp))
                    if refused is not None:
                        raise FetchError(f"server refused: {refused}", transient=False)
                if resp.status == 416 and have:
                    return  # nothing left to fetch: the hash tells whether it is whole
                if resp.status == 206 and have:
                    offset = _range_start(resp.headers.get("Content-Range", ""))
                    if offset != have:
                        raise FetchError(f"server resumed at {offset}, not {have}", True)
                elif resp.status == 200:
                    have = 0  # no resume from this server: from the start
                else:
                    raise FetchError(
                        f"HTTP {resp.status} {resp.reason or ''}".strip(),
                        transient=resp.status in TRANSIENT_HTTP,
                    )
                expected = None if resp.content_length is None else have + resp.content_length
                if expected is not None and expected > self.limits.max_bytes:
                    raise FetchError(
                        f"{expected} bytes, more than the limit of {self.limits.max_bytes}",
                        transient=False,
                    )
                try:
                    got = await self._write(resp, dest, have)
                except aiohttp.ClientPayloadError:
                    if expected is None:
                        raise
                    got = await asyncio.to_thread(_size, dest)
                if expected is not None and got < expected:
                    raise FetchError(
                        f"incomplete: the transfer ended after {got} of {expected} bytes",
                        transient=True,
                    )
        except aiohttp.ClientPayloadError as err:  # no length said: only the server knows
            raise FetchError(f"incomplete: the transfer was cut short ({err})", True) from None
        except (aiohttp.ClientError, TimeoutError) as err:
            raise FetchError(str(err) or type(err).__name__, transient=True) from None

    async def _write(self, resp: aiohttp.ClientResponse, dest: Path, have: int) -> int:
        """The body appended at ``have``; each megabyte written from a thread."""
        try:
            out = await asyncio.to_thread(dest.open, "ab" if have else "wb")
        except OSError as err:
            raise _local(err, dest) from None
        got = have
        buffer = bytearray()
        try:
            try:
                async for chunk in resp.content.iter_chunked(READ):
                    got += len(chunk)
                    if got > self.limits.max_bytes:
                        raise FetchError(
                            f"more than the limit of {self.limits.max_bytes} bytes",
                            transient=False,
                        )
                    buffer += chunk
                    if len(buffer) >= READ:
                        await asyncio.to_thread(out.write, bytes(buffer))
                        buffer.clear()
            finally:
                # What arrived before a transfer was cut short is kept: the next try
                # resumes after it.
                if buffer:
                    await asyncio.to_thread(out.write, bytes(buffer))
            await asyncio.to_thread(out.close)  # a full disk may show only here
        except OSError as err:
            raise _local(err, dest) from None
        finally:
            if not out.closed:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(out.close)
        return got


def _server_certificate(resp: aiohttp.ClientResponse) -> bytes | None:
    """The certificate the server showed on this response's connection (None: none)."""
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(tls, ssl.SSLObject):
        return None
    return tls.getpeercert(binary_form=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _range_start(content_range: str) -> int | None:
    """The first byte of ``bytes FIRST-LAST/SIZE``."""
    unit, _, spec = content_range.partition(" ")
    first, _, _ = spec.partition("-")
    return int(first) if unit == "bytes" and first.isdigit() else None
