"""Running PostgreSQL's programs as its OS user, bounded in time, and watching its PIDs.

PostgreSQL refuses to run as root. An agent running as root starts every program
through ``setpriv`` (which execs, so the child's PID is the program's); an agent
running as the database's OS user starts them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hapair.workshop_agent.pg.errors import PgError

POLL_S = 0.005
PG_ROOT = Path("/usr/lib/postgresql")


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/N/bin`` (Debian), else where ``pg_ctl`` is on PATH."""
    versions = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PgError("find PostgreSQL", f"no PostgreSQL binaries in {PG_ROOT}/*/bin or on PATH")


@dataclass(frozen=True)
class Runner:
    """How to run PostgreSQL's programs as ``os_user``."""

    bin_dir: Path
    os_user: str
    uid: int
    gid: int
    prefix: tuple[str, ...]

    @classmethod
    def for_user(cls, os_user: str, bin_dir: Path | None = None) -> Runner:
        try:
            entry = pwd.getpwnam(os_user)
        except KeyError:
            raise PgError(
                "find OS user", f"no user {os_user!r} on this node (database.os_user)"
            ) from None
        bin_dir = bin_dir or find_bin_dir()
        if os.geteuid() == entry.pw_uid:
            prefix: tuple[str, ...] = ()
        elif os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise PgError("find OS user", "setpriv (util-linux) is needed to run as " + os_user)
            prefix = (
                setpriv,
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--init-groups",
            )
        else:
            raise PgError("find OS user", f"the agent must run as root or as {os_user!r}")
        return cls(bin_dir, os_user, entry.pw_uid, entry.pw_gid, prefix)

    def argv(self, program: str, *args: str) -> list[str]:
        return [*self.prefix, str(self.bin_dir / program), *args]

    def env(self, **extra: str) -> dict[str, str]:
        # A clean environment: nothing of the agent's (PGHOST, PGPASSWORD...) leaks in.
        base = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        return {**base, **extra}


async def run(
    runner: Runner,
    step: str,
    program: str,
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> str:
    """Run a program to completion; its stdout, or a PgError with its output's tail."""
    proc = await asyncio.create_subprocess_exec(
        *runner.argv(program, *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=runner.env(**(env or {})),
        start_new_session=True,  # its own group: a timeout kills its children too
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise PgError(step, f"{program} did not finish within {timeout:g} s; killed") from None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode != 0:
        raise PgError(step, f"{program} exited with code {proc.returncode}", stderr or stdout)
    return stdout


@dataclass(frozen=True)
class PidFile:
    """``postmaster.pid``: the postmaster's PID, its shared memory id and its status."""

    pid: int
    shm_id: int | None
    status: str  # starting, ready, standby, stopping; "" before the line is written


def read_pid_file(data_dir: Path) -> PidFile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    shm_id = None
    if len(lines) > 6 and len(lines[6].split()) == 2:
        with contextlib.suppress(ValueError):
            shm_id = int(lines[6].split()[1])
    status = lines[7].strip() if len(lines) > 7 else ""
    return PidFile(pid, shm_id, status)


def process_state(pid: int, data_dir: Path | None = None) -> str | None:
    """``running``, ``zombie`` or None when there is no such postgres process.

    A PID that now belongs to something else (not postgres, or a postgres working in
    another directory) counts as gone: the lock file is stale. A zombie still counts:
    PostgreSQL's own lock check sees it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    if state == "Z":
        return "zombie"
    if name not in ("postgres", "postmaster"):
        return None
    if data_dir is not None:
        with contextlib.suppress(OSError):  # the postmaster works in its data dir
            if Path(os.readlink(f"/proc/{pid}/cwd")) != data_dir.resolve():
                return None
    return "running"


def running_pid(data_dir: Path) -> int | None:
    """The postmaster serving ``data_dir``, if one is alive."""
    pid_file = read_pid_file(data_dir)
    if pid_file is None or process_state(pid_file.pid, data_dir) != "running":
        return None
    return pid_file.pid


def shm_attached(shm_id: int) -> int:
    """How many processes still have the old server's shared memory attached."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return 0
    header = lines[0].split() if lines else []
    if "shmid" not in header or "nattch" not in header:
        return 0
    at_id, at_n = header.index("shmid"), header.index("nattch")
    for line in lines[1:]:
        cols = line.split()
        if len(cols) > max(at_id, at_n) and cols[at_id] == str(shm_id):
            return int(cols[at_n])
    return 0


async def wait_gone(data_dir: Path, timeout: float, step: str) -> None:
    """Wait until no old postmaster (not even a zombie) nor any of its children holds
    ``data_dir``: a start, pg_rewind or single-user recovery refuses until then."""
    pid_file = read_pid_file(data_dir)
    if pid_file is None:
        return
    deadline = time.monotonic() + timeout
    while process_state(pid_file.pid, data_dir) is not None or (
        pid_file.shm_id is not None and shm_attached(pid_file.shm_id) > 0
    ):
        if time.monotonic() > deadline:
            raise PgError(
                step,
                f"old postmaster {pid_file.pid} or its children still alive after {timeout:g} s",
            )
        await asyncio.sleep(POLL_S)


def children(parent: int) -> list[int]:
    """The PIDs whose parent is ``parent`` (a postmaster's backends and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == parent:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def signal_pid(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
