"""Starting a program in a pseudo-terminal of a given size (``hapair top`` needs one)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path


def spawn_in_pty(
    argv: Sequence[str],
    env: Mapping[str, str],
    rows: int,
    cols: int,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """The process, in its own session, and the terminal's master end (non-blocking).

    The environment is this process's without COLUMNS and LINES (they would override
    the terminal's size), with TERM set and ``env`` on top.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    full = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    full.update(TERM="xterm-256color", **env)
    proc = subprocess.Popen(
        list(argv),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=full,
        cwd=cwd,
        start_new_session=True,
    )
    os.close(slave)
    os.set_blocking(master, False)
    return proc, master
