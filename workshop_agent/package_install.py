"""A package's ``install:``: one process (and whatever it starts) run as the service's
user inside the version's directory, its output appended to a log (beside the services'
own), killed whole at its timeout, when the install is abandoned, or with the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from hapair.workshop_agent.run_as import RunAs, process_ids
from hapair.workshop_agent.service_process import LOG_DIR_MODE, LOG_MODE, SETPRIV


class PackageError(Exception):
    """A version could not be installed; the message says at which step and why."""


async def run_install(
    argv: list[str], top: Path, run_as: RunAs, env: dict[str, str], log: Path, timeout: float
) -> None:
    """Run ``argv`` in ``top``; PackageError says why it failed (its last line of output
    among it)."""
    fd = await asyncio.to_thread(_open_log, log)
    try:
        try:
            # Dies with the agent: a next run removes the unfinished directory, and no
            # orphan may write into it while it does.
            prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=top,
                env=env,
                start_new_session=True,  # its own group: killed with all it started
                **process_ids(run_as),
            )
        except OSError as err:
            raise PackageError(f"install: cannot run {argv[0]}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
    except (TimeoutError, asyncio.CancelledError) as err:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(err, TimeoutError):
            raise PackageError(f"install: not done within {timeout:g}s") from None
        raise
    if code != 0:
        tail = await asyncio.to_thread(_last_line, log)
        raise PackageError(
            f"install: {argv[0]} exited with code {code}"
            + (f": {tail}" if tail else "")
            + f" (output in {log})"
        )


def _open_log(path: Path) -> int:
    path.parent.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 400))
        lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip()[:200] if lines else ""
    return ""
