"""The last step before a service's program runs:
``exec_guard.py <until> <cgroup> <go-fd> -- argv``.

The agent checks that its term is still valid before it forks a service, but a freeze
of the agent (or of this child) between that check and the ``exec`` would start the
service after another node may have taken over. So the child itself checks, as its very
last step, that the fence point the agent passed (``until``, on ``CLOCK_BOOTTIME``, the
clock of every fence deadline) has not passed, and refuses with ``REFUSED`` otherwise.
Before that it moves into the run's own cgroup (``-``: none), so that everything the
service will ever fork is in it from the start, then waits for one byte on ``go-fd``
(``-``: no wait), which the agent writes once its watchdog knows this process's group:
a service the watchdog does not know would survive the agent frozen. End of file
instead (the agent died, or decided the service must not start) and it refuses.

Run as ``python -I -S``: standard library only, no site, a few milliseconds.
"""

from __future__ import annotations

import os
import sys
import time

REFUSED = 75  # EX_TEMPFAIL: the term ended before the service could start
USAGE = 64


def main(args: list[str]) -> int:
    if len(args) < 5 or args[3] != "--":
        print(
            "usage: exec_guard.py <until> <cgroup|-> <go-fd|-> -- <program> [args...]",
            file=sys.stderr,
        )
        return USAGE
    until, cgroup, go, argv = float(args[0]), args[1], args[2], args[4:]
    if cgroup != "-":
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    if go != "-":
        try:
            released = os.read(int(go), 1)
        finally:
            os.close(int(go))  # the program does not inherit it
        if not released:
            print("not started: the agent did not release it", file=sys.stderr)
            return REFUSED
    if not time.clock_gettime(time.CLOCK_BOOTTIME) < until:
        print("not started: the fence point has passed", file=sys.stderr)
        return REFUSED
    os.execv(argv[0], argv)
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
