"""Health probes for services: tcp, http or a command, each bounded by a timeout.

Every probe answers ``None`` when healthy or a short sentence saying what failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from urllib.parse import urlsplit

from hapair.shared.topology import Health, expand
from hapair.workshop_agent.run_as import RunAs, process_ids


async def probe(
    health: Health,
    values: dict[str, str],
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
                return await _http(expand(health.http, values))
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


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r\n]")


@functools.cache
def _tls() -> ssl.SSLContext:
    """https checks trust the system's CAs and check the host name, as a browser would."""
    return ssl.create_default_context()


async def _http(url: str) -> str | None:
    """One GET on a new connection, healthy on a 2xx or 3xx status (a redirect proves
    the server answers; it is not followed). Only the status line is read: a probe a
    second must cost the agent next to nothing."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port or (443 if tls else 80), ssl=_tls() if tls else None
        )
    except (OSError, ValueError) as err:
        return f"http {url}: {getattr(err, 'strerror', None) or err}"
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: hapair-agent\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        line = await reader.readline()
    except (OSError, ValueError) as err:
        return f"http {url}: {getattr(err, 'strerror', None) or err}"
    finally:
        # Not awaited: the answer is in, and a TLS peer slow to close must not turn it
        # into a timeout.
        writer.close()
    found = _STATUS_LINE.match(line)
    if found is None:
        return f"http {url}: not an HTTP answer ({line[:40]!r})"
    status = int(found.group(1))
    return None if 200 <= status < 400 else f"http {url}: status {status}"


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
