"""Real-time CPU scheduling for the agent and its watchdog: busy services never delay the
fence timing.

The term beat fences an active whose agent has not run for ``fence_ms`` (150 ms by
default) while its standby's promises stopped, and the safety argument needs the
watchdog's kill within a quarter of the margin of its deadline. On a server whose
programs keep every core busy the kernel's fair scheduler can leave a process waiting
that long: the active then fences itself for nothing, or its watchdog kills late. So, as
corosync does, the agent's event loop runs under the real-time round-robin policy
(``SCHED_RR``), which the kernel runs before any ordinary process, and its watchdog one
priority above it (it must kill even an agent that spins).

``SCHED_RESET_ON_FORK``: every process they start (services, PostgreSQL, ``ip``) and
every thread (the default executor's, the etcd client library's) gets the ordinary
policy back. The kernel keeps 5 % of every second for ordinary processes
(``/proc/sys/kernel/sched_rt_runtime_us``), so even a runaway agent cannot lock a
server up.
"""

from __future__ import annotations

import os

POLICY = os.SCHED_RR | os.SCHED_RESET_ON_FORK
DEFAULT = 10  # above ordinary processes; below the kernel's own real-time threads (99)


def take(priority: int, pid: int = 0) -> str | None:
    """Run ``pid`` (0: the calling thread) under ``SCHED_RR`` at ``priority``: ``None``
    once done, else why the kernel refused (no ``CAP_SYS_NICE``, or a cgroup that gives
    real-time tasks no CPU time)."""
    try:
        os.sched_setscheduler(pid, POLICY, os.sched_param(priority))
    except OSError as err:
        return err.strerror or str(err)
    return None


def realtime() -> bool:
    """Whether the calling thread runs under a real-time policy now."""
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK in (os.SCHED_RR, os.SCHED_FIFO)
