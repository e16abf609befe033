"""Health probes for services: tcp, http or a command, each bounded by a timeout.

Every probe answers ``None`` when healthy or a short sentence saying what failed.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from hapair.shared.topology import Health, expand
from hapair.workshop_agent.run_as import RunAs, process_ids


async def probe(
    health: Health,
    values: dict[str, str],
    session: aiohttp.ClientSession,
    run_as: RunAs,
    env: dict[str, str],
) -> str | None:
    """Run the check once, placeholders filled from ``values``; a command runs as the
    service does, ``run_as`` with ``env``."""
    try:
        async with asyncio.timeout(health.timeout_s):
            if health.tcp is not None:
                return await _tcp(expand(health.tcp, values))
            if health.http is not None:
                return await _http(session, expand(health.http, values))
            if health.command is not None:
                return await _command([expand(a, values) for a in health.command], run_as, env)
    except TimeoutError:
        return f"no answer within {health.timeout_s}s"
    return None


async def _tcp(target: str) -> str | None:
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except OSError as err:
        return f"tcp {target}: {err.strerror or err}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _http(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if 200 <= resp.status < 400:
                return None
            return f"http {url}: status {resp.status}"
    except aiohttp.ClientError as err:
        return f"http {url}: {err}"


async def _command(argv: list[str], run_as: RunAs, env: dict[str, str]) -> str | None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            **process_ids(run_as),
        )
    except OSError as err:
        return f"command {argv[0]}: {err.strerror or err}"
    try:
        code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return None if code == 0 else f"command {argv[0]} exited with {code}"
