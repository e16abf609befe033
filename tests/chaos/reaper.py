"""``python -m tests.chaos.reaper PID``: removes what a chaos run left once it is gone.

A run cleans up after itself, even when interrupted; this covers the one case it
cannot, being killed outright (SIGKILL, a timeout). The run starts this process in a
session of its own, so that a signal to the run's process group spares it, and keeps
its stdin open: end of file means the run has ended. A line ``keep`` first keeps the
run's directory (``--keep``); its namespaces, and every process in them, are always
removed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tests.chaos.run import remove_leftovers

GONE_WITHIN_S = 10.0


def main() -> None:
    pid = int(sys.argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # outlive a Ctrl-C of the run's terminal
    keep = sys.stdin.read().strip() == "keep"
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        return  # it closed its end but lives on: it is still cleaning up itself
    left = remove_leftovers(pid, keep_dir=keep)
    if left:
        print(f"chaos reaper: removed what run {pid} left: {', '.join(left)}", file=sys.stderr)


if __name__ == "__main__":
    main()
