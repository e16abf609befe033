"""Fault injection for tests, off unless the environment names a file.

``HAPAIR_TEST_<STEP>_GATE=<path>`` holds back ``step`` (``follow``: a standby does not
follow; ``promote``: a promotion fails) while that file exists. Nothing in etcd or on
the network can turn it on.
"""

from __future__ import annotations

import os


def held(step: str) -> bool:
    gate = os.environ.get(f"HAPAIR_TEST_{step.upper()}_GATE")
    return gate is not None and os.path.exists(gate)
