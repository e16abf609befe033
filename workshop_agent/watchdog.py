"""The watchdog: a separate small process that kills active-only services when the
agent stops extending its deadline (agent frozen or hung) or dies (its pipe closes).

The agent cannot fence itself while it is frozen, so this process holds the deadline
(the fence point plus half the margin) and acts on it alone. Protocol, one line each
on stdin: ``deadline <CLOCK_BOOTTIME seconds>``, ``add <pgid> <start>``, ``del <pgid>``,
``cgroup add <path>``, ``cgroup del <path>``, ``cgroup tree <path>``,
``pg add <data dir>``, ``pg del <data dir>`` (percent-encoded),
``vip add <address/prefix> <interface>``, ``vip del <address/prefix> <interface>``,
``lease <id>`` (``lease -``: none). It writes ``fired`` on stdout each time it kills
at a deadline, which the agent counts once it runs again (a metric).
At the deadline it removes the registered virtual addresses first (clients must stop
reaching this node before anything else), then kills every registered cgroup and process
group. On end of file it does the same, kills and removes the agent's whole cgroup tree
(``cgroup tree``) and exits: neither services nor the virtual address outlive their
agent. Anything registered while the deadline has passed is killed at once: it was
started by an agent that had not yet seen its term end.

The agent's end of the pipe closes only when the agent is gone (or when it has stepped
down and revoked its lease at a clean stop), so on end of file nothing can take its term
up again: once every process it killed is confirmed gone (each leader's pidfd readable,
no live process left in its group or its cgroup, no postmaster serving a registered data
directory, every virtual address removed), the watchdog revokes the agent's last lease
over etcd's gRPC API (``lease_revoke.py``, with the agent's certificate, given by
``--etcd`` and the ``--etcd-ca``/``--etcd-cert``/``--etcd-key`` options), which ends the
term, its endpoints and the node's status at once, as the lease's expiry would, later.
A restarted agent waits for the node lock this process holds, so it comes after the
revoke. Not at a deadline: a frozen agent may resume with its lease still live and take
its term up again, and nothing in etcd could order a revoke after that. If anything is
not confirmed gone within a second, or etcd cannot be reached, or this process is
frozen or killed itself, the lease expires as it would have.

Deadlines are on ``CLOCK_BOOTTIME``, which goes on counting while the machine is
suspended, and the wait is cut into short slices (the kernel's own timeouts are on the
monotonic clock, which stops): a watchdog resumed after a suspend acts at once.

A group is registered with its leader's start time (``/proc/<pid>/stat``, field 22),
which the watchdog checks as it opens a pidfd on the leader: from then on the pidfd
says whether that very process still holds its PID, so a PID the kernel has given to
another process since is never killed. A primary's data directory is registered too,
from before its promotion until it has stopped: at the deadline the watchdog kills
whichever postmaster serves it then (named by its ``postmaster.pid``, a postgres working
in that directory), so a server the agent restarted in place is killed even before the
agent has registered its new PID, and so is one the agent froze while promoting it. (The
agent registers a leader right after the fork, while it is its unreaped child; only a
leader that died, was reaped and whose PID came round again within one clock tick before
this process read the line could be mistaken for the new holder.) The service's program
runs only once its registration is in this process's pipe (the exec guard waits for the
agent's release): the pipe keeps the order, and this process reads it whatever the agent
does next, so an agent frozen right after a fork leaves no service unknown here.

It inherits the agent's node lock, so a restarted agent cannot take the node's pair
back before this process has finished killing the previous run's services.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from stat import S_ISFIFO
from typing import IO, TYPE_CHECKING
from urllib.parse import quote, unquote

from hapair.shared.clock import Clock, boottime
from hapair.workshop_agent import cgroups, priority
from hapair.workshop_agent.etcd_target import Target

if TYPE_CHECKING:
    # Not loaded here: pki brings pydantic, and this process starts at once; lease_revoke
    # (sockets, HTTP/2) is needed only at the agent's death, and loaded then.
    from hapair.shared.pki import TlsFiles
    from hapair.workshop_agent import lease_revoke

# A test's fault only, off unless set in the agent's environment: the watchdog stops
# itself (``stop``: SIGSTOP) or dies (``kill``: SIGKILL) right before it would revoke
# its dead agent's lease, to show the lease's expiry still ends the term.
BEFORE_REVOKE = os.environ.get("HAPAIR_TEST_WATCHDOG_BEFORE_REVOKE", "")

# How long one wait lasts at most: the bound on acting late after a suspend.
SLICE_S = 0.1


def _log(message: str, **fields: object) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    print(
        f'ts={stamp} level=warning logger=hapair.watchdog event="{message}"{extra}',
        file=sys.stderr,
        flush=True,
    )


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None: no such process).

    A PID and its start time name one process for the whole life of the machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of the whole line


def serving_postmaster(data_dir: Path) -> int | None:
    """The postmaster serving ``data_dir`` now: the PID its ``postmaster.pid`` names, if
    that is a postgres working in that directory (else the file is stale).

    Not ``hapair.workshop_agent.pg``'s own check: that package loads pydantic, seconds on a
    busy machine, and this process must start at once."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    running = name in ("postgres", "postmaster") and cwd == data_dir.resolve()
    return pid if running else None


class Leader:
    """A registered group's leader, pinned by a pidfd (None: it was gone already)."""

    def __init__(self, pid: int, start: int) -> None:
        self.pid = pid
        self.pidfd: int | None = None
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
            # The start time read after the open proves the pidfd is the registered one.
            if start_time(pid) == start:
                self.pidfd = fd
            else:
                os.close(fd)

    def holds_its_pid(self) -> bool:
        """True until the leader has been reaped (a zombie still holds its PID)."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # not allowed to signal it, but it exists
        return True

    def kill_group(self) -> bool:
        """Kill the group; False if its id now belongs to somebody else.

        A leader that has died and been reaped (its children may still run in its group)
        leaves its PID unused as long as the group has members: the kernel gives no
        process a PID that is still some group's id. A process with that PID is then
        someone else's, and so is its group."""
        leader = self.holds_its_pid()
        if not leader and start_time(self.pid) is not None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if leader and self.pidfd is not None:  # and the leader, had it left its group
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Registered:
    """What the agent registered. A plain class: ``dataclasses`` alone would add a
    megabyte and a half to this process (``inspect`` and the parser's modules)."""

    def __init__(self) -> None:
        self.groups: dict[int, Leader] = {}
        self.cgroups: set[str] = set()
        self.vips: set[tuple[str, str]] = set()
        self.trees: set[str] = set()  # removed when the agent is gone
        self.data_dirs: set[str] = set()  # of a primary: kill its postmaster
        self.lease: int | None = None  # the agent's: revoked once the agent is gone

    def __bool__(self) -> bool:
        return bool(self.groups or self.cgroups or self.vips or self.data_dirs)

    def add(self, pgid: int, start: int) -> None:
        self.remove(pgid)
        self.groups[pgid] = Leader(pgid, start)

    def remove(self, pgid: int) -> None:
        old = self.groups.pop(pgid, None)
        if old is not None:
            old.close()


def _kill_all(
    reg: Registered, why: str, clock: Clock, meanwhile: Callable[[], None] = lambda: None
) -> bool:
    """Kill everything registered; True once all of it is confirmed gone. ``meanwhile``
    runs once the signals are sent, while the processes die."""
    for path in sorted(reg.cgroups):
        cgroups.kill(Path(path))
    leaders = list(reg.groups.values())
    for data_dir in sorted(reg.data_dirs):
        pid = serving_postmaster(Path(data_dir))
        start = None if pid is None else start_time(pid)
        if pid is not None and start is not None and pid not in reg.groups:
            leaders.append(Leader(pid, start))  # a postmaster not registered (yet)
    killed = [leader for leader in leaders if leader.kill_group()]
    if reg.groups or reg.cgroups or killed:
        _log(f"killed {len(reg.cgroups)} service cgroup(s) and {len(killed)} group(s): {why}")
    meanwhile()
    gone = _await_gone(killed, sorted(reg.cgroups), clock)
    for leader in leaders:
        leader.close()
    reg.groups.clear()
    reg.cgroups.clear()
    # A data directory stays registered until the agent says it is no longer primary:
    # whatever postmaster serves it while the deadline has passed is killed.
    return gone and all(serving_postmaster(Path(d)) is None for d in reg.data_dirs)


GONE_WAIT_S = 1.0
POLL_S = 0.01


def _await_gone(leaders: list[Leader], paths: list[str], clock: Clock) -> bool:
    """Log when each killed leader has exited (its pidfd turns readable) and each killed
    cgroup is empty, bounded: the record of when a service really ended while its agent
    could not see it. True once, besides, no live process is left in any killed group."""
    sel = selectors.DefaultSelector()
    for leader in leaders:
        if leader.pidfd is not None:
            sel.register(leader.pidfd, selectors.EVENT_READ, leader)
    waiting = set(paths)
    groups = {leader.pid for leader in leaders}
    deadline = clock() + GONE_WAIT_S
    while (left := deadline - clock()) > 0:
        # The kernel tells no one when a cgroup empties but through cgroup.events, nor
        # when a group has no member left: poll.
        polling = waiting or not sel.get_map()
        for key, _ in sel.select(min(left, POLL_S) if polling else left):
            sel.unregister(key.fileobj)
            _log("service gone", pid=key.data.pid, at=repr(clock()))
        for path in sorted(p for p in waiting if not cgroups.populated(Path(p))):
            waiting.discard(path)
            _log("cgroup emptied", cgroup=path, at=repr(clock()))
        if not sel.get_map() and not waiting:
            groups = live_groups(groups)
            if not groups:
                break
    sel.close()
    return not (sel.get_map() or waiting or groups)


def live_groups(groups: set[int]) -> set[int]:
    """Which of these process groups still have a live member (a zombie is dead: it
    runs no code and holds no socket, whenever its new parent reaps it)."""
    if not groups:
        return groups
    live = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) in groups and state not in ("Z", "X"):
            live.add(int(pgrp))
    return live


VIP_TIMEOUT_S = 1.0


Vip = tuple[str, str]  # address/prefix, interface


def _ip(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "-4", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def _drop_vips(vips: set[Vip]) -> dict[Vip, subprocess.Popen[bytes] | None]:
    """Start removing every virtual address; the caller waits (bounded) afterwards."""
    procs: dict[Vip, subprocess.Popen[bytes] | None] = {}
    for address, interface in sorted(vips):
        try:
            procs[(address, interface)] = _ip("addr", "del", address, "dev", interface)
        except OSError:
            procs[(address, interface)] = None
    if vips:
        _log(f"removing virtual address(es) {', '.join(a for a, _ in sorted(vips))}")
    vips.clear()
    return procs


def _finished(proc: subprocess.Popen[bytes]) -> bytes | None:
    """What ``proc`` printed, once it exited with 0 in time (None: it did not)."""
    try:
        out, _ = proc.communicate(timeout=VIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return out if proc.returncode == 0 else None


def _vip_gone(vip: Vip, proc: subprocess.Popen[bytes] | None) -> bool:
    """Whether the address is off its interface: removed now, or found absent."""
    if proc is not None and _finished(proc) is not None:
        return True
    address, interface = vip
    try:
        shown = _finished(_ip("-o", "addr", "show", "dev", interface))
    except OSError:
        return False
    return shown is not None and f" {address} " not in shown.decode(errors="replace")


def _stop_everything(
    reg: Registered, why: str, clock: Clock, meanwhile: Callable[[], None] = lambda: None
) -> bool:
    """Remove the addresses, kill the services; True once all of it is confirmed."""
    procs = _drop_vips(reg.vips)
    killed = _kill_all(reg, why, clock, meanwhile)
    removed = [_vip_gone(vip, proc) for vip, proc in procs.items()]
    return killed and all(removed)


def _agent_gone(reg: Registered, etcd: Target | None, clock: Clock) -> None:
    """Stop everything; once all of it is confirmed, revoke the agent's lease (its term,
    endpoints and status end at once); then remove the agent's cgroup tree, which holds
    no active-only service any more (the services that run on every node may outlive
    the term: they run on the other nodes as well).

    The connection to etcd is opened while the killed processes die (loading OpenSSL
    and the handshake take longer than most deaths); the revoke is sent only after."""
    revoking = reg.lease is not None and etcd is not None
    opened: list[lease_revoke.Opened] = []

    def connect() -> None:
        if revoking and etcd is not None:
            # Loaded now, while the killed processes die, not at start: an idle
            # watchdog does not carry it.
            try:
                from hapair.workshop_agent import lease_revoke
            except ImportError:
                return  # tried again, and said, as the revoke is
            with contextlib.suppress(lease_revoke.RevokeError):  # tried again to revoke
                opened.append(lease_revoke.connect_first(etcd))

    stopped = _stop_everything(reg, "agent gone", clock, connect)
    if stopped and revoking and etcd is not None and reg.lease is not None:
        _end_term(reg.lease, etcd, opened[0] if opened else None, clock)
    else:
        for _, _, sock in opened:
            sock.close()
        if revoking:
            _log("not all the agent ran is confirmed gone: its lease will expire")
    for tree in reg.trees:
        cgroups.CgroupTree(Path(tree)).close()


def _end_term(lease: int, etcd: Target, opened: lease_revoke.Opened | None, clock: Clock) -> None:
    try:
        from hapair.workshop_agent import lease_revoke  # loaded already by the connect
    except ImportError as err:
        # A package replaced under this long-lived process, say: its work is done all
        # the same (everything killed, the cgroup tree removed); the lease expires.
        _log("cannot load the lease revoke: the agent's lease will expire", error=f'"{err}"')
        return
    if BEFORE_REVOKE in ("stop", "kill"):
        _log("test fault: stopping before the revoke", fault=BEFORE_REVOKE)
        os.kill(os.getpid(), signal.SIGSTOP if BEFORE_REVOKE == "stop" else signal.SIGKILL)
    try:
        outcome = lease_revoke.revoke(etcd, lease, opened=opened)
    except lease_revoke.RevokeError as err:
        _log(
            "could not revoke the agent's lease: it will expire",
            lease=f"{lease:x}",
            error=f'"{err}"',
        )
        return
    _log(f"agent gone: its lease {outcome}, its term ended", lease=f"{lease:x}", at=repr(clock()))


def serve(stream: IO[bytes], clock: Clock = boottime, etcd: Target | None = None) -> None:
    """Read commands until end of file; kill on deadline and on exit; once the agent is
    gone and all it ran is confirmed dead, revoke its lease on ``etcd``."""
    deadline = reported = float("inf")
    reg = Registered()
    buffer = b""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        left = deadline - clock()
        # Past the deadline there is nothing to wait for but commands.
        timeout = None if left == float("inf") or left <= 0 else min(left, SLICE_S)
        if sel.select(timeout):
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                _agent_gone(reg, etcd, clock)
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.decode(errors="replace").split()
                try:
                    deadline = _apply(words, reg, deadline)
                except ValueError:
                    _log(f"ignored bad command {' '.join(words)!r}")
        if reg and clock() >= deadline:
            _stop_everything(reg, "agent did not confirm its lease before the fence point", clock)
            if reported != deadline:  # once per deadline missed, however often it acts
                _report(b"fired\n")
                reported = deadline


def _report(line: bytes) -> None:
    """Tell the agent on stdout, the pipe its link gave (it reads it once it runs again);
    never wait: an agent frozen long enough to fill the pipe loses the count, not this
    process. Anything else on stdout (a terminal) is not this process's to change."""
    with contextlib.suppress(OSError):
        if S_ISFIFO(os.fstat(1).st_mode):
            os.set_blocking(1, False)
            os.write(1, line)


def _apply(words: list[str], reg: Registered, deadline: float) -> float:
    match words:
        case ["deadline", value]:
            at = float(value)
            if math.isnan(at):
                raise ValueError(value)
            return at
        case ["add", pgid, start]:
            reg.add(int(pgid), int(start))
        case ["del", pgid]:
            reg.remove(int(pgid))
        case ["cgroup", "add", path]:
            reg.cgroups.add(path)
        case ["cgroup", "del", path]:
            reg.cgroups.discard(path)
        case ["cgroup", "tree", path]:
            reg.trees.add(path)
        case ["pg", "add", path]:
            reg.data_dirs.add(unquote(path))
        case ["pg", "del", path]:
            reg.data_dirs.discard(unquote(path))
        case ["vip", "add", address, interface]:
            reg.vips.add((address, interface))
        case ["vip", "del", address, interface]:
            reg.vips.discard((address, interface))
        case ["lease", "-"]:
            reg.lease = None
        case ["lease", value]:
            reg.lease = int(value, 16)
        case _:
            _log(f"ignored bad command {' '.join(words)!r}")
    return deadline


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group; the watchdog must outlive
    # the agent's own shutdown, which ends by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, etcd=_target(sys.argv[1:]))


def _target(argv: list[str]) -> Target | None:
    """Where the agent's etcd is, from ``--etcd URLS`` and the TLS file options; checked
    here, at start, though only the agent's death needs it: a bad one is said at once."""
    given = dict(zip(argv[::2], argv[1::2], strict=False))
    urls = given.get("--etcd")
    if urls is None:
        return None
    try:
        return Target.parse(
            urls, given.get("--etcd-ca"), given.get("--etcd-cert"), given.get("--etcd-key")
        )
    except ValueError as err:
        _log(f"etcd not usable, the agent's lease will expire on its own: {err}")
        return None


class WatchdogLink:
    """The agent's end: starts the watchdog and feeds it (non-blocking, tiny writes)."""

    def __init__(
        self,
        keep_fds: tuple[int, ...] = (),
        etcd: str | None = None,
        tls: TlsFiles | None = None,
        realtime: int = 0,
    ) -> None:
        """``realtime``: the watchdog's ``SCHED_RR`` priority (0: ordinary)."""
        self._keep_fds = keep_fds
        self._realtime = realtime
        self.realtime_refused: str | None = None  # why the kernel refused it, if it did
        # Where the watchdog revokes the agent's lease once the agent is gone.
        self._etcd_args: list[str] = []
        if etcd is not None:
            self._etcd_args = ["--etcd", etcd]
            if tls is not None:
                for option, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
                    if path is not None:
                        self._etcd_args += [f"--etcd-{option}", str(path)]
        self._lease: int | None = None
        self.firings = 0  # deadlines at which the watchdog killed, since the agent started
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: dict[int, int] = {}
        self._cgroups: set[str] = set()
        self._trees: set[str] = set()
        self._data_dirs: set[str] = set()
        self._vips: set[tuple[str, str]] = set()
        self._deadline = float("inf")

    def start(self) -> None:
        old = self._proc
        if old is not None and old.stdout is not None:
            self._drain(old)  # what a watchdog that exited still had to say
            old.stdout.close()
        if old is not None and old.stdin is not None:
            with contextlib.suppress(OSError):  # its pipe is broken: it has exited
                old.stdin.close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hapair.workshop_agent.watchdog", *self._etcd_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=self._keep_fds,
            start_new_session=True,
        )
        if self._realtime:
            self.realtime_refused = priority.take(self._realtime, self._proc.pid)
        for pgid, start in self._groups.items():
            self._send(f"add {pgid} {start}")
        for path in self._cgroups:
            self._send(f"cgroup add {path}")
        for path in self._trees:
            self._send(f"cgroup tree {path}")
        for path in self._data_dirs:
            self._send(f"pg add {quote(path)}")
        for address, interface in self._vips:
            self._send(f"vip add {address} {interface}")
        self._send(self._lease_line())
        self._send(f"deadline {self._deadline!r}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                _log("watchdog exited; starting a new one")
            self.start()
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self.start()

    def deadline(self, at: float) -> None:
        """``at`` on ``CLOCK_BOOTTIME`` (``hapair.shared.clock.boottime``)."""
        self._deadline = at
        self._send(f"deadline {at!r}")
        self.read_reports()

    def read_reports(self) -> int:
        """Count the deadlines at which the watchdog killed since the last read (it says
        so on its stdout, which waits for this agent while it is frozen); how many."""
        return self._drain(self._proc)

    def _drain(self, proc: subprocess.Popen[bytes] | None) -> int:
        out = proc.stdout if proc is not None else None
        if out is None or out.closed:
            return 0
        said = b""
        with contextlib.suppress(OSError):
            os.set_blocking(out.fileno(), False)
            while chunk := os.read(out.fileno(), 4096):
                said += chunk
        fired = said.count(b"fired\n")
        if fired:
            self.firings += fired
            _log(
                "the watchdog killed the active's services at a deadline this agent had "
                "not extended (it was frozen or hung)",
                times=fired,
            )
        return fired

    def lease(self, lease: int | None) -> None:
        """The agent's lease now: the watchdog revokes it once the agent is gone."""
        if lease != self._lease:
            self._lease = lease
            self._send(self._lease_line())

    def _lease_line(self) -> str:
        return "lease -" if self._lease is None else f"lease {self._lease:x}"

    def add(self, pgid: int) -> bool:
        """Register the group led by ``pgid``, now (right after the fork), while that PID
        is surely the leader's; False if it has already gone."""
        start = start_time(pgid)
        if start is None:
            return False
        if self._groups.get(pgid) == start:
            return True
        self._groups[pgid] = start
        self._send(f"add {pgid} {start}")
        return True

    def remove(self, pgid: int) -> None:
        self._groups.pop(pgid, None)
        self._send(f"del {pgid}")

    def add_cgroup(self, path: Path) -> None:
        self._cgroups.add(str(path))
        self._send(f"cgroup add {path}")

    def add_tree(self, path: Path) -> None:
        """Kill and remove this cgroup tree once the agent is gone (not at a deadline)."""
        self._trees.add(str(path))
        self._send(f"cgroup tree {path}")

    def add_data_dir(self, path: Path) -> None:
        """A primary's data directory: the watchdog kills the postmaster serving it."""
        if str(path) not in self._data_dirs:
            self._data_dirs.add(str(path))
            self._send(f"pg add {quote(str(path))}")

    def remove_data_dir(self, path: Path) -> None:
        if str(path) in self._data_dirs:
            self._data_dirs.discard(str(path))
            self._send(f"pg del {quote(str(path))}")

    def remove_cgroup(self, path: Path) -> None:
        self._cgroups.discard(str(path))
        self._send(f"cgroup del {path}")

    def add_vip(self, address: str, interface: str) -> None:
        """Removed by the watchdog at the deadline, before it kills the services."""
        self._vips.add((address, interface))
        self._send(f"vip add {address} {interface}")

    def remove_vip(self, address: str, interface: str) -> None:
        self._vips.discard((address, interface))
        self._send(f"vip del {address} {interface}")

    def close(self) -> None:
        """Close the pipe: the watchdog kills what is still registered and exits. The
        agent has stepped down and revoked its lease itself: nothing is left to revoke."""
        if self._proc is not None and self._proc.poll() is None:
            self.lease(None)
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


if __name__ == "__main__":
    main()
