"""Fault injection for tests, off unless the environment names a file.

``HAPAIR_TEST_<STEP>_GATE=<path>`` holds back ``step`` (``follow``: a standby does not
follow; ``promote``: a promotion fails; ``beat``: no term beat is sent to etcd, the
first of a term taken up included, ``beating.py``) while that file exists.
``HAPAIR_TEST_STOP_<POINT>=<path>``: the process stops itself (SIGSTOP) at ``point``
while that file exists, as an agent frozen at exactly that step would (``after_sync_names``:
the primary's ``synchronous_standby_names`` just changed, the sync record not yet).
Nothing in etcd or on the network can turn either on.
"""

from __future__ import annotations

import os
import signal


def held(step: str) -> bool:
    gate = os.environ.get(f"HAPAIR_TEST_{step.upper()}_GATE")
    return gate is not None and os.path.exists(gate)


def stop_at(point: str) -> None:
    path = os.environ.get(f"HAPAIR_TEST_STOP_{point.upper()}")
    if path is not None and os.path.exists(path):
        os.kill(os.getpid(), signal.SIGSTOP)
