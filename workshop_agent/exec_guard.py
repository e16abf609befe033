"""The last step before a service's program runs:
``exec_guard.py <until> <cgroup> <go-fd> <ids> -- argv``.

The agent checks that its term is still valid before it forks a service, but a freeze
of the agent (or of this child) between that check and the ``exec`` would start the
service after another node may have taken over. So the child itself checks, as its very
last step, that the fence point the agent passed (``until``, on ``CLOCK_BOOTTIME``, the
clock of every fence deadline) has not passed, and refuses with ``REFUSED`` otherwise.
Before that it moves into the run's own cgroup (``-``: none), so that everything the
service will ever fork is in it from the start, then waits for the agent's word on ``go-fd``
(``-``: no wait), which it writes once its watchdog knows this process's group: its
fence point then, newer than ``until`` (a single byte keeps ``until``);
a service the watchdog does not know would survive the agent frozen. End of file
instead (the agent died, or decided the service must not start) and it refuses.
Then it becomes the service's user (``ids``: ``UID:GID:GROUP,...``; ``-``: stays who it
is): supplementary groups, group, user, in that order, after the cgroup (joining it
takes the agent's rights) and before the program. A change of user clears the parent
death signal ``setpriv`` set, so it is set again, and the parent checked to still be
there after.

Run as ``python -I -S``: standard library only, no site, a few milliseconds.
"""

from __future__ import annotations

import os
import sys
import time

REFUSED = 75  # EX_TEMPFAIL: the term ended before the service could start
NO_USER = 77  # EX_NOPERM: it could not become the service's user
USAGE = 64
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2


def encode_ids(uid: int, gid: int, groups: tuple[int, ...]) -> str:
    return f"{uid}:{gid}:{','.join(str(g) for g in groups)}"


def become(ids: str) -> None:
    """Drop to ``ids`` (``UID:GID:GROUPS``) for good, keeping the parent death signal."""
    import ctypes  # only here: a service that keeps the agent's user starts without it

    uid, gid, groups = ids.split(":")
    libc = ctypes.CDLL(None, use_errno=True)
    deathsig = ctypes.c_int(0)
    libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(deathsig), 0, 0, 0)
    parent = os.getppid()
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
    if deathsig.value:
        if libc.prctl(PR_SET_PDEATHSIG, deathsig.value, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # it died before the signal was set again
            raise OSError("the agent died while the service changed its user")


def main(args: list[str]) -> int:
    if len(args) < 6 or args[4] != "--":
        print(
            "usage: exec_guard.py <until> <cgroup|-> <go-fd|-> <uid:gid:groups|-> -- "
            "<program> [args...]",
            file=sys.stderr,
        )
        return USAGE
    until, cgroup, go, ids, argv = float(args[0]), args[1], args[2], args[3], args[5:]
    if cgroup != "-":
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    if go != "-":
        try:
            released = os.read(int(go), 64)  # one write, well under PIPE_BUF: whole
        finally:
            os.close(int(go))  # the program does not inherit it
        if not released:
            print("not started: the agent did not release it", file=sys.stderr)
            return REFUSED
        if released != b"\1":
            until = float(released)  # the agent's fence point when it released it
    if ids != "-":
        try:
            become(ids)
        except OSError as err:
            print(f"not started: cannot become {ids}: {err}", file=sys.stderr)
            return NO_USER
    if not time.clock_gettime(time.CLOCK_BOOTTIME) < until:
        print("not started: the fence point has passed", file=sys.stderr)
        return REFUSED
    os.execv(argv[0], argv)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
