"""What the kernel says about a benchmark's processes: CPU time, waiting for a CPU,
resident memory, a core's busy time; and a process's nice level set."""

from __future__ import annotations

import os
from pathlib import Path


def run_delay(pid: int | str = "self") -> float:
    """Seconds this process has waited for a CPU while runnable (/proc schedstat): how
    much other work on the machine got in its way."""
    return sched_seconds(pid)[1]


def sched_seconds(pid: int | str = "self") -> tuple[float, float]:
    """(on a CPU, waiting for one while runnable) in seconds, summed over the threads
    the process has now (``/proc/PID/schedstat`` is its first thread's alone: a Go
    program such as etcd works on others), precise to the nanosecond, unlike the stat
    file's ticks."""
    on, waiting = 0, 0
    for task in _threads(pid):
        try:
            fields = (task / "schedstat").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        on, waiting = on + int(fields[0]), waiting + int(fields[1])
    return on / 1e9, waiting / 1e9


def _threads(pid: int | str) -> list[Path]:
    """The ``/proc`` directory of each thread ``pid`` has now."""
    return list(Path(f"/proc/{pid}/task").iterdir())


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of ``core`` since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                ticks = [int(x) for x in line.split()[1:]]
                idle = ticks[3] + ticks[4]  # idle and iowait
                return sum(ticks) - idle, sum(ticks)
    raise RuntimeError(f"cpu{core} not in /proc/stat")


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def renice(pid: int | str, nice: int) -> None:
    """Give every thread of ``pid`` the nice level ``nice`` (on Linux a nice level is
    a thread's: the threads it starts later inherit it from the one that starts them)."""
    for task in _threads(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
        except ProcessLookupError:
            continue
