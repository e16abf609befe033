"""One cgroup (v2) per service run, so a fence reaches every process the service started.

A process group is not enough: a service that double-forks and calls ``setsid`` leaves
it, and survives ``killpg``. A cgroup cannot be left by an unprivileged service, and
``cgroup.kill`` (Linux 5.14) kills everything in it at once; on older kernels every
process in it is frozen, killed and thawed.

The agent's subtree is ``<its own cgroup>/hapair-<node>-<pid>``: under systemd the unit
delegates its cgroup (``Delegate=yes``), elsewhere root may create it beside the agent.
Where cgroup v2 is not mounted or not writable the agent says so once and fences by
process group alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path

PREFIX = "hapair-"
_RUNS = itertools.count(1)  # run numbers, unique for the agent's life
# Test hook, off unless set in the agent's environment: fence by process group alone, as
# on a host without cgroup v2.
NO_CGROUPS = bool(os.environ.get("HAPAIR_TEST_NO_CGROUPS"))


def _mount_point() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified``
    on a hybrid host)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        head, _, tail = line.partition(" - ")
        if tail.split(" ", 1)[0] == "cgroup2":
            return Path(head.split()[4])
    return None


def _own_path() -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def populated(cgroup: Path) -> bool:
    try:
        text = (cgroup / "cgroup.events").read_text()
    except OSError:
        return False
    return "populated 1" in text


def signal_all(cgroup: Path, sig: int, signalled_group: int | None = None) -> None:
    """Send ``sig`` to every process in ``cgroup`` except the members of the process
    group ``signalled_group`` (already signalled as a group): a second SIGTERM landing in
    a service's handler for the first can hang it until the SIGKILL."""
    for pid in procs(cgroup):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if signalled_group is not None and os.getpgid(pid) == signalled_group:
                continue
            os.kill(pid, sig)


def kill(cgroup: Path) -> None:
    """SIGKILL every process in ``cgroup``, including those forked meanwhile."""
    if not cgroup.is_dir():
        return
    try:
        (cgroup / "cgroup.kill").write_text("1")
        return
    except OSError:
        pass  # a kernel before 5.14
    # Frozen, nothing in it can fork between the listing and the kill.
    with contextlib.suppress(OSError):
        (cgroup / "cgroup.freeze").write_text("1")
    signal_all(cgroup, signal.SIGKILL)
    with contextlib.suppress(OSError):
        (cgroup / "cgroup.freeze").write_text("0")


def remove(cgroup: Path) -> bool:
    """Remove an empty cgroup; False while processes are still leaving it."""
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class CgroupTree:
    """The agent's own subtree: one child cgroup per service run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, node: str) -> tuple[CgroupTree | None, str]:
        """The tree, or None and why not (the caller says so once and uses groups)."""
        if NO_CGROUPS:
            return None, "cgroups turned off by HAPAIR_TEST_NO_CGROUPS"
        mount, own = _mount_point(), _own_path()
        if mount is None or own is None:
            return None, "cgroup v2 is not mounted"
        parent = mount / own.lstrip("/")
        _remove_stale(parent, node)
        root = parent / f"{PREFIX}{node}-{os.getpid()}"
        try:
            root.mkdir(exist_ok=True)
            probe = root / "probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError as err:
            return None, f"cannot create a cgroup under {parent}: {err.strerror}"
        return cls(root), ""

    def new_run(self, service: str) -> Path | None:
        path = self.root / f"{service}.{next(_RUNS)}"
        try:
            path.mkdir()
        except OSError:
            return None
        return path

    def close(self) -> None:
        """Kill what is left and remove the tree (bounded: one second)."""
        runs = [p for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []
        for run in runs:
            kill(run)
        deadline = time.monotonic() + 1.0
        while runs and time.monotonic() < deadline:
            runs = [run for run in runs if not remove(run)]
            if runs:
                time.sleep(0.01)
        remove(self.root)


def clear_stale(node: str) -> None:
    """Remove the empty subtrees that agents of ``node`` now gone left below this
    process's own cgroup: what a program that ran such agents as its children (a
    test) leaves behind once it killed them."""
    mount, own = _mount_point(), _own_path()
    if mount is not None and own is not None:
        _remove_stale(mount / own.lstrip("/"), node)


def _remove_stale(parent: Path, node: str) -> None:
    """Empty subtrees of earlier runs of this node's agent (killed before it could clean)."""
    with contextlib.suppress(OSError):
        for old in parent.glob(f"{PREFIX}{node}-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            for run in old.iterdir():
                if run.is_dir():
                    remove(run)
            remove(old)
