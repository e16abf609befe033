"""Process control of one PostgreSQL data dir: initdb, start, stop, promote, clone, rewind.

Every program runs bounded in time (``proc.run``). The server is signalled directly
and polled here: ``pg_ctl -w`` polls every 100 ms, which would double a switchover.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hapair.workshop_agent.pg import files
from hapair.workshop_agent.pg.config import Layout
from hapair.workshop_agent.pg.errors import PgError, tail
from hapair.workshop_agent.pg.proc import (
    POLL_S,
    Runner,
    children,
    read_pid_file,
    run,
    running_pid,
    signal_pid,
    wait_gone,
)
from hapair.workshop_agent.pg.secrets import Secret
from hapair.workshop_agent.pg.status import format_lsn, parse_lsn

LOG_ROTATE_BYTES = 16 * 1024 * 1024
_WALDUMP_END = re.compile(
    r"error in WAL record at ([0-9A-F]+/[0-9A-F]+): invalid record length at ([0-9A-F]+/[0-9A-F]+)"
)


def prepare_dirs(layout: Layout, runner: Runner) -> None:
    """The run dir (socket, pgpass, log) beside the data dir, 0700, owned by os_user."""
    layout.run_dir.parent.mkdir(parents=True, exist_ok=True)
    layout.run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(layout.run_dir, runner.uid, runner.gid)
    os.chmod(layout.run_dir, 0o700)


def make_empty_dir(path: Path, runner: Runner) -> None:
    path.mkdir(mode=0o700, parents=False, exist_ok=False)
    os.chown(path, runner.uid, runner.gid)
    os.chmod(path, 0o700)


def is_cluster(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").is_file() and (data_dir / "global" / "pg_control").is_file()


def is_empty(data_dir: Path) -> bool:
    return not data_dir.exists() or not any(data_dir.iterdir())


async def initdb(
    runner: Runner, layout: Layout, superuser: str, password: Secret, timeout: float = 120
) -> None:
    """A new cluster with data checksums (pg_rewind needs them or wal_log_hints)."""
    if layout.data_dir.exists():  # empty, perhaps made by an operator as root
        os.chown(layout.data_dir, runner.uid, runner.gid)
        os.chmod(layout.data_dir, 0o700)
    else:
        make_empty_dir(layout.data_dir, runner)
    template = _template(superuser, password)
    if template is not None and template.is_dir():
        await asyncio.to_thread(_copy_tree, template, layout.data_dir, runner)
    else:
        pwfile = layout.run_dir / "initdb.pw"
        files.write_file(pwfile, password.reveal() + "\n", runner.uid, runner.gid)
        try:
            await run(
                runner,
                "initdb",
                "initdb",
                "-D",
                str(layout.data_dir),
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=C",
                f"--username={superuser}",
                f"--pwfile={pwfile}",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                timeout=timeout,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if template is not None:
            await asyncio.to_thread(_keep_template, layout.data_dir, template, runner)
    # Our postgresql.conf includes initdb's (locale, time zone...) under another name.
    os.replace(layout.data_dir / "postgresql.conf", layout.data_dir / files.BASE_CONF)


def _template(superuser: str, password: Secret) -> Path | None:
    """A test hook, off by default: HAPAIR_TEST_INITDB_TEMPLATES names a directory where
    the first initdb of each superuser and password is kept, to be copied instead of run
    again (an initdb spends seconds waiting for its files to reach the disk, and a test
    suite makes hundreds of clusters). The copies share one system identifier."""
    templates = os.environ.get("HAPAIR_TEST_INITDB_TEMPLATES")
    if not templates:
        return None
    key = hashlib.sha256(f"{superuser}\0{password.reveal()}".encode()).hexdigest()[:16]
    return Path(templates) / key


def _copy_tree(source: Path, dest: Path, runner: Runner) -> None:
    """``source``'s files into the directory ``dest``, owned by the runner."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    for root, dirs, names in os.walk(dest):
        for name in [*dirs, *names]:
            os.chown(os.path.join(root, name), runner.uid, runner.gid, follow_symlinks=False)


def _keep_template(data_dir: Path, template: Path, runner: Runner) -> None:
    """A copy of a fresh initdb's ``data_dir`` as ``template``, whole or not at all: it is
    copied beside it and renamed, and another process's copy, made at the same time, wins
    if it was renamed first."""
    template.parent.mkdir(parents=True, exist_ok=True)
    staging = template.with_name(f"{template.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    _copy_tree(data_dir, staging, runner)
    try:
        os.rename(staging, template)
    except OSError:  # already there
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class ControlData:
    """The few ``pg_controldata`` fields the decisions need."""

    state: str
    system_id: str
    checkpoint: int
    checkpoint_timeline: int
    min_recovery: int
    min_recovery_timeline: int
    rewindable: bool  # data checksums or wal_log_hints

    @property
    def clean_primary(self) -> bool:
        return self.state == "shut down"

    @property
    def was_standby(self) -> bool:
        return self.state in ("shut down in recovery", "in archive recovery")


async def controldata(runner: Runner, data_dir: Path, timeout: float = 10) -> ControlData:
    out = await run(
        runner, "pg_controldata", "pg_controldata", "-D", str(data_dir), timeout=timeout
    )
    fields = dict(
        (k.strip(), v.strip())
        for k, sep, v in (line.partition(":") for line in out.splitlines())
        if sep
    )
    try:
        return ControlData(
            state=fields["Database cluster state"],
            system_id=fields["Database system identifier"],
            checkpoint=parse_lsn(fields["Latest checkpoint location"]),
            checkpoint_timeline=int(fields["Latest checkpoint's TimeLineID"]),
            min_recovery=parse_lsn(fields["Minimum recovery ending location"]),
            min_recovery_timeline=int(fields["Min recovery ending loc's timeline"]),
            rewindable=fields.get("Data page checksum version", "0") != "0"
            or fields.get("wal_log_hints setting") == "on",
        )
    except (KeyError, ValueError) as err:
        raise PgError("pg_controldata", f"unexpected output, missing or bad {err}", out) from None


def _rotate_log(log_file: Path) -> None:
    try:
        if log_file.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_file, log_file.with_name(log_file.name + ".1"))
    except FileNotFoundError:
        pass


def log_tail(layout: Layout) -> str:
    try:
        with layout.log_file.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return tail(f.read().decode(errors="replace"))
    except OSError:
        return ""


async def start(runner: Runner, layout: Layout, timeout: float) -> int:
    """Start the postmaster and wait until it accepts connections; its PID.

    The postmaster is our child (so it is reaped at once when it dies, never left a
    zombie that would block a rewind) in a session of its own, with no death signal:
    the database outlives an agent restart, which finds it through postmaster.pid.
    Stops waiting, leaving it starting, after ``timeout`` (a long crash recovery).
    """
    await wait_gone(layout.data_dir, 10, "start")
    _rotate_log(layout.log_file)
    log_fd = os.open(layout.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            *runner.argv("postgres", "-D", str(layout.data_dir)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=runner.env(),
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise PgError("start", f"postgres exited with code {proc.returncode}", log_tail(layout))
        pid_file = read_pid_file(layout.data_dir)
        if pid_file and pid_file.pid == proc.pid and pid_file.status in ("ready", "standby"):
            return proc.pid
        await asyncio.sleep(POLL_S)
    return proc.pid


async def stop(layout: Layout, *, fast_s: float, step: str = "stop") -> bool:
    """Stop the postmaster: fast shutdown (SIGINT), then immediate (SIGQUIT) after
    ``fast_s``, then SIGKILL to it and every child. True if the fast shutdown did it.

    A frozen (SIGSTOPped) server is resumed after each signal, so it handles it.
    """
    pid = running_pid(layout.data_dir)
    if pid is None:
        return True
    for sig, limit in ((signal.SIGINT, fast_s), (signal.SIGQUIT, 2.0)):
        signal_pid(pid, sig)
        for member in [pid, *children(pid)]:
            signal_pid(member, signal.SIGCONT)
        if await _gone(pid, limit):
            await wait_gone(layout.data_dir, 10, step)
            return sig == signal.SIGINT
    # Children first: once the postmaster is gone they are init's, out of our sight.
    for member in [*children(pid), pid]:
        signal_pid(member, signal.SIGKILL)
    if not await _gone(pid, 5.0):
        raise PgError(step, f"postmaster {pid} survived SIGKILL")
    await wait_gone(layout.data_dir, 10, step)
    return False


async def _gone(pid: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _zombie(pid):
            return True
        await asyncio.sleep(POLL_S)
    return False


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")


async def promote(runner: Runner, layout: Layout, timeout: float = 10) -> None:
    """Ask a standby to promote, without pg_ctl's 100 ms polling (``-W``)."""
    await run(
        runner, "promote", "pg_ctl", "promote", "-W", "-D", str(layout.data_dir), timeout=timeout
    )


def nudge_promote(layout: Layout) -> bool:
    """Wake a promoting standby that sleeps through its promotion.

    Seen here: after losing the primary, the startup process can notice the promote
    request and still wait out ``wal_retrieve_retry_interval`` before it finishes
    recovery. While the request file is unread, the postmaster is signalled again
    (SIGUSR1, it re-reads the file); once read, the startup process gets SIGUSR2, the
    very signal the postmaster sends it for a promotion, which only sets its latch.
    Call it only after ``promote``.
    """
    pid = running_pid(layout.data_dir)
    if pid is None:
        return False
    if (layout.data_dir / "promote").exists():
        return signal_pid(pid, signal.SIGUSR1)
    startup = child_named(pid, "startup")
    return startup is not None and signal_pid(startup, signal.SIGUSR2)


def child_named(parent: int, role: str) -> int | None:
    """The child of ``parent`` whose process title names ``role`` (``postgres: ... startup``)."""
    for pid in children(parent):
        try:
            title = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if f": {role}" in title:
            return pid
    return None


async def basebackup(runner: Runner, layout: Layout, conninfo: str, timeout: float) -> None:
    """Clone the primary into a staging dir, then move it into place (data dir absent)."""
    if layout.staging.exists():
        shutil.rmtree(layout.staging)
    make_empty_dir(layout.staging, runner)
    try:
        await run(
            runner,
            "pg_basebackup",
            "pg_basebackup",
            "-D",
            str(layout.staging),
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-password",
            "-d",
            conninfo,
            timeout=timeout,
            env={"PGPASSFILE": str(layout.passfile)},
        )
    except PgError:
        shutil.rmtree(layout.staging, ignore_errors=True)
        raise
    os.replace(layout.staging, layout.data_dir)


async def rewind(runner: Runner, layout: Layout, conninfo: str, timeout: float) -> str:
    """pg_rewind from the primary; its output. The caller ran CHECKPOINT there first."""
    # A leftover standby.signal makes pg_rewind's crash-recovery step fail.
    (layout.data_dir / "standby.signal").unlink(missing_ok=True)
    await wait_gone(layout.data_dir, 10, "pg_rewind")
    return await run(
        runner,
        "pg_rewind",
        "pg_rewind",
        "-D",
        str(layout.data_dir),
        "--source-server",
        conninfo,
        timeout=timeout,
        env={"PGPASSFILE": str(layout.passfile)},
    )


async def checkpoint_end(runner: Runner, layout: Layout, timeline: int, lsn: int) -> int | None:
    """Where the (shutdown) checkpoint record at ``lsn`` ends, read with pg_waldump;
    None unless it is the last record. Its length depends on version and platform."""
    try:
        await run(
            runner,
            "pg_waldump",
            "pg_waldump",
            "-p",
            str(layout.data_dir / "pg_wal"),
            "-t",
            str(timeline),
            "-s",
            format_lsn(lsn),
            "-n",
            "2",
            timeout=10,
        )
    except PgError as err:
        match = _WALDUMP_END.search(err.stderr)
        if match and parse_lsn(match.group(1)) == lsn:
            return parse_lsn(match.group(2))
    return None
